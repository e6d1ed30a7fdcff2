"""The `convnet` family: the one place networks are assembled.

A convnet is a stack of blocks, then a head, then a fully connected classifier:

    block b:    convs[b] x (Conv2d -> [BatchNorm2d] -> activation) -> [pool] -> [dropout]
                (channels[b] x width wide; `width` scales the fc widths too)
                (block_order "conv_act_dropout_bn_pool", the three-conv notebook's:
                 convs[b] x (Conv2d -> activation -> [dropout] -> [BatchNorm2d]) -> [pool])
    head:       Flatten, or AdaptiveAvg/MaxPool2d(adaptive_size) -> Flatten
    classifier: for each width in fc: Linear -> activation -> [Dropout(fc_dropout)] -> [BatchNorm1d];
                Linear(num_classes)

Every other model (lenet5, alexnet, the presets) is this function with fixed params. The
classifier's input size is computed from the input shape, never typed by hand, and an
architecture that would shrink the image below 1x1 is refused here, at build time
(`ModelShapeError`). When `padding` is not given, convs are unpadded where that fits the input
and padded 'same' where it cannot (the defaults on 8x8 digits), so a network that trains today
keeps its layout and the defaults fit every dataset.
Conv layers keep their bias even with batchnorm so the presets match the notebooks' networks.
Every layer is a fresh module: no module or parameter is ever shared between two places.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from torch import nn

from ._registry import ModelConfigError, ModelShapeError, register_model

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU}
POOLS = {"none": None, "max": nn.MaxPool2d, "avg": nn.AvgPool2d}
HEADS = {"flatten": None, "adaptive_avg": nn.AdaptiveAvgPool2d, "adaptive_max": nn.AdaptiveMaxPool2d}
BLOCK_ORDERS = ("conv_bn_act_pool_dropout", "conv_act_dropout_bn_pool")

DEFAULTS: dict[str, Any] = {
    "channels": [32, 64],  # output channels per block; the number of blocks is len(channels)
    "convs": 1,  # convs per block
    "kernel_size": 3,
    "padding": 0,  # int or "same"; not given: 0, or "same" where unpadded convs cannot fit the input
    "pool": "max",  # per block: none | max | avg
    "pool_size": 2,  # pooling kernel = stride
    "dropout": 0.0,  # per block, after its pooling (see block_order)
    "dropout2d": False,  # block dropout drops whole channels (nn.Dropout2d)
    "batchnorm": False,  # a BatchNorm2d after every conv, each conv its own
    "activation": "relu",
    "head": "flatten",
    "adaptive_size": 5,  # output side of an adaptive head
    "fc": [128],  # hidden widths of the classifier
    "fc_dropout": 0.0,  # after each hidden layer, before the next Linear
    "fc_batchnorm": False,  # a BatchNorm1d after each hidden layer (after its dropout), each its own
    # Where batchnorm and block dropout sit. The default: Conv -> BN -> act per conv, then pool,
    # then dropout. "conv_act_dropout_bn_pool": Conv -> act -> dropout -> BN per conv, then pool
    # (the dropout is per conv, before the pool).
    "block_order": BLOCK_ORDERS[0],
    # Scales every conv's channels and every hidden fc width (rounded, at least 1): one knob for
    # a network's size that keeps its shape, as EfficientNet's width coefficient does. 1: as given.
    "width": 1.0,
}

# A check is (predicate, what the value must be); the message names the key that failed it.
Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _one_of(options: Any) -> Check:
    return (lambda v: isinstance(v, str) and v in options, "one of " + ", ".join(map(repr, options)))


POSITIVE_INT: Check = (lambda v: _is_int(v) and v >= 1, "a positive integer")
POSITIVE_NUMBER: Check = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
                          "a number > 0")
PADDING: Check = (lambda v: v == "same" or (_is_int(v) and v >= 0), "a non-negative integer or 'same'")
PROBABILITY: Check = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                      "a probability in [0, 1)")
BOOL: Check = (lambda v: isinstance(v, bool), "true or false")

PER_BLOCK: dict[str, Check] = {
    "convs": POSITIVE_INT,
    "kernel_size": POSITIVE_INT,
    "padding": PADDING,
    "pool": _one_of(POOLS),
    "dropout": PROBABILITY,
}
SCALARS: dict[str, Check] = {
    "pool_size": POSITIVE_INT,
    "dropout2d": BOOL,
    "batchnorm": BOOL,
    "activation": _one_of(ACTIVATIONS),
    "head": _one_of(HEADS),
    "adaptive_size": POSITIVE_INT,
    "fc_dropout": PROBABILITY,
    "fc_batchnorm": BOOL,
    "block_order": _one_of(BLOCK_ORDERS),
    "width": POSITIVE_NUMBER,
}


def _check(name: str, key: str, value: Any, check: Check) -> Any:
    ok, expected = check
    if not ok(value):
        raise ModelConfigError(f"{name}: {key} must be {expected}, got {value!r}")
    return value


def _int_list(name: str, key: str, value: Any, *, allow_empty: bool) -> list[int]:
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ModelConfigError(f"{name}: {key} must be a list of positive integers, got {value!r}")
    return [_check(name, f"{key}[{i}]", v, POSITIVE_INT) for i, v in enumerate(value)]


def resolve_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validates convnet params and fills defaults; per-block keys become one entry per block.

    Args:
        name: the model name used in error messages (a preset names itself, not "convnet").
        params: user params; any subset of `DEFAULTS`.

    Returns:
        A complete params dict with every per-block key a list of len(channels).

    Raises:
        ModelConfigError: an unknown key, a bad value or a list of the wrong length, naming the key.
    """
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ModelConfigError(f"{name}: unknown param {unknown[0]!r} (valid: {', '.join(DEFAULTS)})")
    p = {**DEFAULTS, **params}
    p["channels"] = _int_list(name, "channels", p["channels"], allow_empty=False)
    p["fc"] = _int_list(name, "fc", p["fc"], allow_empty=True)
    blocks = len(p["channels"])
    for key, check in PER_BLOCK.items():
        value = p[key]
        if not isinstance(value, (list, tuple)):
            value = [value] * blocks
        elif len(value) != blocks:
            raise ModelConfigError(f"{name}: {key} has {len(value)} entries but channels has {blocks} blocks; "
                                   f"give one value or one per block")
        p[key] = [_check(name, f"{key}[{i}]", v, check) for i, v in enumerate(value)]
    for key, check in SCALARS.items():
        _check(name, key, p[key], check)
    if p["width"] != 1:
        p["channels"] = [max(1, round(c * p["width"])) for c in p["channels"]]
        p["fc"] = [max(1, round(w * p["width"])) for w in p["fc"]]
    return p


def build_convnet(in_shape: tuple[int, int, int], num_classes: int, params: dict[str, Any],
                  name: str = "convnet") -> nn.Sequential:
    """Assembles a convnet for `in_shape` images (see the module docstring for the layout).

    Args:
        in_shape: (channels, height, width) of the input images.
        num_classes: number of output logits.
        params: any subset of `DEFAULTS`.
        name: the model name used in error messages.

    Returns:
        nn.Sequential with children `features`, `head` and `classifier`; it returns logits.

    Raises:
        ModelConfigError: bad params.
        ModelShapeError: a block shrinks the input below 1x1.
    """
    if "padding" not in params:
        try:
            return _assemble(in_shape, num_classes, params, name)
        except ModelShapeError as unpadded:
            try:
                return _assemble(in_shape, num_classes, {**params, "padding": "same"}, name)
            except ModelShapeError:
                raise unpadded from None
    return _assemble(in_shape, num_classes, params, name)


def _assemble(in_shape: tuple[int, int, int], num_classes: int, params: dict[str, Any], name: str) -> nn.Sequential:
    p = resolve_params(name, params)
    activation = ACTIVATIONS[p["activation"]]
    block_dropout = nn.Dropout2d if p["dropout2d"] else nn.Dropout
    size = in_shape[1:]
    channels = in_shape[0]
    notebook_order = p["block_order"] == "conv_act_dropout_bn_pool"
    features: list[nn.Module] = []
    for b, width in enumerate(p["channels"]):
        k, pad = p["kernel_size"][b], p["padding"][b]
        for _ in range(p["convs"][b]):
            features.append(nn.Conv2d(channels, width, k, padding=pad))
            if notebook_order:
                features.append(activation())
                if p["dropout"][b] > 0:
                    features.append(block_dropout(p["dropout"][b]))
                if p["batchnorm"]:
                    features.append(nn.BatchNorm2d(width))  # a fresh one per conv, never shared
            else:
                if p["batchnorm"]:
                    features.append(nn.BatchNorm2d(width))  # a fresh one per conv, never shared
                features.append(activation())
            channels = width
            size = tuple(s if pad == "same" else s + 2 * pad - k + 1 for s in size)
            _check_fits(name, b, in_shape, size)
        pool = POOLS[p["pool"][b]]
        if pool is not None:
            features.append(pool(p["pool_size"]))
            size = tuple(s // p["pool_size"] for s in size)
            _check_fits(name, b, in_shape, size)
        if p["dropout"][b] > 0 and not notebook_order:
            features.append(block_dropout(p["dropout"][b]))

    head: list[nn.Module] = []
    adaptive = HEADS[p["head"]]
    if adaptive is not None:
        # Larger than the feature map is allowed (PyTorch repeats values): pointless, not wrong.
        head.append(adaptive(p["adaptive_size"]))
        size = (p["adaptive_size"], p["adaptive_size"])
    head.append(nn.Flatten())

    classifier: list[nn.Module] = []
    width_in = channels * size[0] * size[1]
    for width in p["fc"]:
        classifier += [nn.Linear(width_in, width), activation()]
        if p["fc_dropout"] > 0:
            classifier.append(nn.Dropout(p["fc_dropout"]))
        if p["fc_batchnorm"]:
            classifier.append(nn.BatchNorm1d(width))  # a fresh one per hidden layer, never shared
        width_in = width
    classifier.append(nn.Linear(width_in, num_classes))

    return nn.Sequential(OrderedDict(
        features=nn.Sequential(*features), head=nn.Sequential(*head), classifier=nn.Sequential(*classifier)))


def _check_fits(name: str, block: int, in_shape: tuple[int, int, int], size: tuple[int, ...]) -> None:
    if min(size) < 1:
        h, w = (max(s, 0) for s in size)
        raise ModelShapeError(f"{name}: block {block + 1} shrinks the {in_shape[1]}x{in_shape[2]} input to "
                              f"{h}x{w}; use fewer poolings, padding or a smaller kernel")


@register_model("convnet")
def convnet(in_shape: tuple[int, int, int], num_classes: int, **params: Any) -> nn.Module:
    """The general family; params as in `DEFAULTS` (defaults: two 3x3 conv blocks, max pooling, fc 128;
    unpadded, or padded 'same' on inputs too small for that, like 8x8 digits)."""
    return build_convnet(in_shape, num_classes, params)
