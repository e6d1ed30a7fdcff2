"""`alexnet`: AlexNet's layout scaled down for 28-32 px images.

Five 3x3 convs (padding 1) with half of AlexNet's widths (32-96-192-128-128), max pools
after conv 1, conv 2 and conv 5 as in the original, a 2x2 adaptive average pool (AlexNet's
6x6 suits 224 px, not 32), and a dropout 0.5 classifier with two hidden layers of 256.
32 px -> 4x4 and 28 px -> 3x3 before the adaptive pool; 8x8 digits -> 1x1, which still works.
Any convnet param can be overridden.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._registry import register_model
from .convnet import build_convnet

PARAMS: dict[str, Any] = {
    "channels": [32, 96, 192, 128, 128],
    "kernel_size": 3,
    "padding": 1,
    "pool": ["max", "max", "none", "none", "max"],
    "head": "adaptive_avg",
    "adaptive_size": 2,
    "fc": [256, 256],
    "fc_dropout": 0.5,
}


@register_model("alexnet")
def alexnet(in_shape: tuple[int, int, int], num_classes: int, **overrides: Any) -> nn.Module:
    """The small AlexNet for 1- or 3-channel images; see the module docstring."""
    return build_convnet(in_shape, num_classes, {**PARAMS, **overrides}, name="alexnet")
