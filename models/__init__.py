"""CNN families for cnnsearch: a registry name -> builder; nothing else builds networks.

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(model="mnist_pool", model_params={"dropout": 0.2})
    >>> count_parameters(build_model(cfg, (1, 28, 28), 10))
    225034
"""

from ._registry import (
    ModelConfigError,
    ModelShapeError,
    UnknownModelError,
    build_model,
    count_parameters,
    list_models,
    register_model,
)

# Importing a family registers it.
from . import alexnet, convnet, lenet, presets  # noqa: F401

__all__ = [
    "ModelConfigError",
    "ModelShapeError",
    "UnknownModelError",
    "build_model",
    "count_parameters",
    "list_models",
    "register_model",
]
