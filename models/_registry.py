"""The model registry: name -> builder, filled by the `@register_model` decorator.

As in timm's `_registry.py`, a family registers itself at import time and everything else
(the search space, the engine, the CLI) builds networks only through `build_model`.
A builder has the signature `builder(in_shape, num_classes, **params) -> nn.Module` and must
validate its own params, raising `ModelConfigError` before any training starts.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from search.errors import CnnsearchError

Builder = Callable[..., nn.Module]

_MODELS: dict[str, Builder] = {}


class UnknownModelError(CnnsearchError):
    """The model name is not registered; the message lists the valid names."""


class ModelConfigError(CnnsearchError):
    """Bad model params, or an architecture impossible for the input shape (one-line reason)."""


class ModelShapeError(ModelConfigError):
    """Valid params whose architecture cannot fit the input shape (e.g. too many poolings for 8x8).

    A property of a point in a search space rather than a mistake in a study file: the search
    prunes such a trial as rejected, while bad params (a plain ModelConfigError) refuse the study.
    """


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Registers a model builder under `name`.

    Args:
        name: lowercase model name, as users write it in `RunConfig.model`.

    Returns:
        A decorator that registers `builder(in_shape, num_classes, **params)` and returns it unchanged.

    Example:
        >>> @register_model("tiny")  # doctest: +SKIP
        ... def tiny(in_shape, num_classes, **params):
        ...     return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
    """

    def decorator(builder: Builder) -> Builder:
        # A silent overwrite would make two modules fight over one name; fail at import instead.
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Returns the registered model names, sorted."""
    return sorted(_MODELS)


def build_model(cfg: Any, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Builds the network a config asks for.

    Args:
        cfg: anything with `.model` (a registered name) and `.model_params` (a dict), e.g. RunConfig.
        in_shape: input shape (channels, height, width).
        num_classes: number of output logits.

    Returns:
        The untrained model; it returns logits (no softmax).

    Raises:
        UnknownModelError: `cfg.model` is not registered.
        ModelConfigError: bad params, or an architecture that cannot fit `in_shape`.
    """
    name = cfg.model
    if not isinstance(name, str) or name not in _MODELS:
        raise UnknownModelError(f"unknown model {name!r} (valid: {', '.join(list_models())})")
    shape = tuple(in_shape)
    if len(shape) != 3 or not all(_is_positive_int(s) for s in shape):
        raise ModelConfigError(f"{name}: in_shape must be (channels, height, width), got {in_shape!r}")
    if not _is_positive_int(num_classes):
        raise ModelConfigError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    params = cfg.model_params or {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"{name}: model_params must be a dict, got {params!r}")
    return _MODELS[name](shape, num_classes, **params)


def count_parameters(model: nn.Module) -> int:
    """Returns the number of trainable parameters of `model`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
