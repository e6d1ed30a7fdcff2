"""`lenet5`: LeNet-5 (two 5x5 conv + 2x2 max-pool pairs, 6 and 16 channels; fc 120-84), ReLU.

Padding follows the input size so the classifier always sees 16x5x5 on 28-32 px images:
32 px and up is the original LeNet-5 (no padding); below 32 px the first conv is padded
'same' (padding 2, as LeNet is usually run on 28 px MNIST); below 28 px the second conv is
padded 'same' too, so 8x8 digits give 16x2x2 instead of an impossible network.
Any convnet param can be overridden, padding included.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._registry import register_model
from .convnet import build_convnet


@register_model("lenet5")
def lenet5(in_shape: tuple[int, int, int], num_classes: int, **overrides: Any) -> nn.Module:
    """LeNet-5 for 1- or 3-channel images of any side from 4 px; see the module docstring."""
    side = min(in_shape[1:])
    params = {
        "channels": [6, 16],
        "kernel_size": 5,
        "padding": [0 if side >= 32 else "same", 0 if side >= 28 else "same"],
        "pool": "max",
        "fc": [120, 84],
    }
    return build_convnet(in_shape, num_classes, {**params, **overrides}, name="lenet5")
