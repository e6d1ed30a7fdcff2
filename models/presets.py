"""Presets: the seed notebooks' networks as fixed convnet params, registered by name.

Each preset accepts any convnet param as an override (model_params={"dropout": 0.3}).
Parameter counts (MNIST presets on 1x28x28, CIFAR presets on 3x32x32, 10 classes):

    mnist_fc 2,770,634   mnist_pool 225,034   mnist_adaptive 225,034
    mnist_adaptive3 93,962   mnist_adaptive7 421,642
    cifar_sixconv 550,570   cifar_sixconv_dropout 550,570   cifar_sixconv_bn 551,466
    cifar_threeconv 434,294   cifar_threeconv_bn 434,718

The MNIST networks use unpadded 3x3 convs; the CIFAR ones pad by 1 (the three-conv net's
notebook did not say, padding 1 keeps 32 -> 16 -> 8 after its two pools).

`cifar_threeconv_bn` is the three-conv notebook's final network, layer for layer:
3 x (Conv2d 3x3 pad 1 -> LeakyReLU -> Dropout2d(0.2) -> BatchNorm2d), MaxPool2d(2) after the
second and third, then Flatten -> Linear(4096, 100) -> LeakyReLU -> Dropout(0.2) -> BatchNorm1d(100)
-> Linear(100, 10). `cifar_threeconv` is the earlier, batchnorm-free layout the cifar10_threeconv
study searches (dropout after the pools, none in the classifier); it is kept as it was.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._registry import Builder, register_model
from .convnet import build_convnet

_MNIST_TWO_CONV = {"channels": [32, 64], "pool": "none", "head": "adaptive_avg"}
_SIXCONV = {"channels": [32, 64, 128], "convs": 2, "padding": 1, "pool": "max"}
# Dropout rising with depth after each pool, and 0.5 between fc128 and the output layer.
_SIXCONV_DROPOUT = {**_SIXCONV, "dropout": [0.2, 0.3, 0.4], "fc_dropout": 0.5}
_THREECONV = {
    "channels": [16, 32, 64],
    "padding": 1,
    "pool": ["none", "max", "max"],
    "dropout": [0.0, 0.2, 0.2],  # after each pool
    "dropout2d": True,
    "activation": "leaky_relu",
    "fc": [100],
}

PRESETS: dict[str, dict[str, Any]] = {
    "mnist_fc": {"channels": [32], "pool": "none"},
    "mnist_pool": {"channels": [32, 64], "pool": ["max", "avg"]},
    "mnist_adaptive": {**_MNIST_TWO_CONV, "adaptive_size": 5},
    "mnist_adaptive3": {**_MNIST_TWO_CONV, "adaptive_size": 3},
    "mnist_adaptive7": {**_MNIST_TWO_CONV, "adaptive_size": 7},
    "cifar_sixconv": _SIXCONV,
    "cifar_sixconv_dropout": _SIXCONV_DROPOUT,
    "cifar_sixconv_bn": {**_SIXCONV_DROPOUT, "batchnorm": True},
    "cifar_threeconv": _THREECONV,
    "cifar_threeconv_bn": {**_THREECONV, "block_order": "conv_act_dropout_bn_pool", "dropout": 0.2,
                           "fc_dropout": 0.2, "batchnorm": True, "fc_batchnorm": True},
}


def _preset_builder(name: str, fixed: dict[str, Any]) -> Builder:
    def builder(in_shape: tuple[int, int, int], num_classes: int, **overrides: Any) -> nn.Module:
        return build_convnet(in_shape, num_classes, {**fixed, **overrides}, name=name)

    builder.__doc__ = f"Preset {name!r}: convnet with {fixed}; any convnet param may be overridden."
    return builder


for _name, _params in PRESETS.items():
    register_model(_name)(_preset_builder(_name, _params))
