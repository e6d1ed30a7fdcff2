"""Tests for models/: every registered model builds, trains one step, and returns logits;
presets have the notebooks' parameter counts; bad configs fail at build with the key's name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import (
    ModelConfigError,
    ModelShapeError,
    UnknownModelError,
    build_model,
    count_parameters,
    list_models,
    register_model,
)

DIGITS, MNIST, CIFAR = (1, 8, 8), (1, 28, 28), (3, 32, 32)


def build(name: str, in_shape=CIFAR, num_classes: int = 10, **params) -> nn.Module:
    return build_model(SimpleNamespace(model=name, model_params=params), in_shape, num_classes)


def _cases():
    """(model, input shape, params): presets on their dataset's shape, families on digits and CIFAR."""
    for name in list_models():
        if name.startswith("mnist_"):
            yield name, MNIST, {}
        elif name.startswith("cifar_"):
            yield name, CIFAR, {}
        else:
            # The default convnet pads 'same' by itself on 8x8 (see test_padding_not_given_...).
            yield name, DIGITS, {}
            yield name, CIFAR, {}
    # Convnet options the presets do not exercise, so their layers get a gradient check too.
    yield "convnet", DIGITS, {"channels": [8, 16], "convs": [2, 1], "padding": [1, "same"], "pool": ["avg", "none"],
                              "batchnorm": True, "activation": "gelu", "head": "adaptive_max", "adaptive_size": 3,
                              "dropout": 0.1, "dropout2d": True, "fc": [32, 16], "fc_dropout": 0.2}
    yield "convnet", MNIST, {"channels": [4], "kernel_size": 4, "pool_size": 3, "fc": []}


@pytest.mark.parametrize("name,in_shape,params", list(_cases()), ids=lambda v: str(v))
def test_every_model_trains_one_step_and_returns_logits(name, in_shape, params):
    torch.manual_seed(0)
    model = build(name, in_shape, num_classes=7, **params).train()
    out = model(torch.randn(3, *in_shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)) for m in model.modules())
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # logits, not probabilities

    out.logsumexp(1).mean().backward()  # touches every logit, like cross-entropy does
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


def conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k + cout


def linear(fin: int, fout: int) -> int:
    return fin * fout + fout


def bn(c: int) -> int:
    return 2 * c  # weight and bias; running stats are buffers


SIXCONV = (conv(3, 32) + conv(32, 32) + conv(32, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128)
           + linear(128 * 4 * 4, 128) + linear(128, 10))  # 32 -> 16 -> 8 -> 4 after three pools
THREECONV = conv(3, 16) + conv(16, 32) + conv(32, 64) + linear(64 * 8 * 8, 100) + linear(100, 10)
EXPECTED_PARAMS = {
    # 28 -> 26 after one unpadded 3x3 conv
    "mnist_fc": conv(1, 32) + linear(32 * 26 * 26, 128) + linear(128, 10),
    # 28 -conv-> 26 -max-> 13 -conv-> 11 -avg-> 5
    "mnist_pool": conv(1, 32) + conv(32, 64) + linear(64 * 5 * 5, 128) + linear(128, 10),
    "mnist_adaptive": conv(1, 32) + conv(32, 64) + linear(64 * 5 * 5, 128) + linear(128, 10),
    "mnist_adaptive3": conv(1, 32) + conv(32, 64) + linear(64 * 3 * 3, 128) + linear(128, 10),
    "mnist_adaptive7": conv(1, 32) + conv(32, 64) + linear(64 * 7 * 7, 128) + linear(128, 10),
    "cifar_sixconv": SIXCONV,
    "cifar_sixconv_dropout": SIXCONV,
    "cifar_sixconv_bn": SIXCONV + bn(32) + bn(32) + bn(64) + bn(64) + bn(128) + bn(128),
    "cifar_threeconv": THREECONV,
    "cifar_threeconv_bn": THREECONV + bn(16) + bn(32) + bn(64),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_count_matches_layer_arithmetic(name):
    in_shape = MNIST if name.startswith("mnist_") else CIFAR
    assert count_parameters(build(name, in_shape)) == EXPECTED_PARAMS[name]


def test_known_counts_from_the_notebooks_and_lenet():
    assert EXPECTED_PARAMS["mnist_fc"] == 2_770_634
    assert EXPECTED_PARAMS["mnist_pool"] == EXPECTED_PARAMS["mnist_adaptive"] == 225_034
    assert EXPECTED_PARAMS["mnist_adaptive3"] == 93_962
    assert EXPECTED_PARAMS["mnist_adaptive7"] == 421_642
    lenet = conv(1, 6, 5) + conv(6, 16, 5) + linear(16 * 5 * 5, 120) + linear(120, 84) + linear(84, 10)
    assert lenet == 61_706  # the classic LeNet-5 figure
    assert count_parameters(build("lenet5", MNIST)) == lenet
    assert count_parameters(build("lenet5", (1, 32, 32))) == lenet  # unpadded on 32 px, same 16x5x5


def test_lenet5_on_digits_pads_to_fit():
    model = build("lenet5", DIGITS)  # 8 -same-> 8 -pool-> 4 -same-> 4 -pool-> 2
    assert model.classifier[0].in_features == 16 * 2 * 2


def test_presets_accept_convnet_overrides():
    model = build("cifar_sixconv", dropout=0.3)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3, 0.3]
    assert count_parameters(build("mnist_pool", MNIST, fc=[64])) == (
        conv(1, 32) + conv(32, 64) + linear(64 * 5 * 5, 64) + linear(64, 10))


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError) as err:
        build("resnet9000")
    message = str(err.value)
    assert "resnet9000" in message and "\n" not in message
    for name in list_models():
        assert name in message


@pytest.mark.parametrize("name,params,key", [
    ("convnet", {"pool": "maxx"}, "pool"),
    ("convnet", {"activation": "tanhh"}, "activation"),
    ("convnet", {"channels": [8, 16, 32], "dropout": [0.1, 0.2]}, "dropout"),
    ("convnet", {"kernel_size": [3, 3, 3]}, "kernel_size"),
    ("convnet", {"padding": "valid"}, "padding"),
    ("convnet", {"channels": []}, "channels"),
    ("convnet", {"fc": [128, 0]}, "fc"),
    ("convnet", {"head": "adaptive"}, "head"),
    ("convnet", {"batchnorm": "yes"}, "batchnorm"),
    ("convnet", {"fc_dropout": 1.0}, "fc_dropout"),
    ("convnet", {"pool_size": True}, "pool_size"),
    ("convnet", {"chanels": [8]}, "chanels"),
    ("cifar_sixconv", {"pool": "maxx"}, "pool"),
    ("lenet5", {"activaton": "relu"}, "activaton"),
])
def test_bad_param_raises_config_error_naming_the_key(name, params, key):
    with pytest.raises(ModelConfigError, match=key) as err:
        build(name, **params)
    assert str(err.value).startswith(f"{name}: ") and "\n" not in str(err.value)


def test_bad_input_shape_or_classes_is_a_config_error():
    with pytest.raises(ModelConfigError, match="in_shape"):
        build("convnet", (28, 28))
    with pytest.raises(ModelConfigError, match="num_classes"):
        build("convnet", MNIST, num_classes=0)


def test_architecture_too_deep_for_8x8_fails_at_build_with_the_block():
    # 8 -conv-> 6 -pool-> 3 -conv-> 1 -pool-> 0: the second block cannot fit.
    with pytest.raises(ModelShapeError) as err:
        build("convnet", DIGITS, channels=[32, 64, 128], padding=0)
    assert str(err.value) == ("convnet: block 2 shrinks the 8x8 input to 0x0; "
                              "use fewer poolings, padding or a smaller kernel")
    with pytest.raises(ModelShapeError, match="block 1"):
        build("convnet", DIGITS, kernel_size=9, padding=0)  # a conv alone can shrink it too
    with pytest.raises(ModelConfigError, match="block 4 shrinks the 8x8"):
        build("convnet", DIGITS, channels=[8, 8, 8, 8], padding="same")  # 8 -> 4 -> 2 -> 1 -> 0
    with pytest.raises(ModelConfigError, match="cifar_sixconv: block 2"):
        build("cifar_sixconv", DIGITS, padding=0)  # 8 -> 6 -> 4 -> 2 -> 0; presets name themselves


def test_padding_not_given_is_unpadded_where_that_fits_and_same_where_not():
    """The default convnet trains on 8x8 digits, and networks that fit unpadded keep their layout
    (model files saved before padded 'same' became the fallback still load)."""
    assert count_parameters(build("convnet", MNIST)) == count_parameters(build("convnet", MNIST, padding=0))
    assert count_parameters(build("convnet", DIGITS)) == count_parameters(build("convnet", DIGITS, padding="same"))
    assert build("convnet", DIGITS)(torch.randn(2, *DIGITS)).shape == (2, 10)
    with pytest.raises(ModelShapeError, match="block 2 shrinks the 8x8 input"):  # neither fits: the unpadded error
        build("convnet", DIGITS, channels=[8, 8, 8, 8])


def test_each_conv_has_its_own_batchnorm():
    for name, params in [("cifar_sixconv_bn", {}), ("cifar_threeconv_bn", {}), ("convnet", {"batchnorm": True})]:
        model = build(name, **params)
        layers = list(model.features)  # a plain list keeps repeats, unlike model.modules()
        convs = [m for m in layers if isinstance(m, nn.Conv2d)]
        norms = [m for m in layers if isinstance(m, nn.BatchNorm2d)]
        assert len(norms) == len(convs) > 0
        assert len({id(m) for m in norms}) == len(norms), "a BatchNorm2d is shared between convs"
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):
                assert layers[i + 1].num_features == layer.out_channels


@pytest.mark.parametrize("size", [3, 5, 7])
def test_adaptive_head_sets_fc_input_size(size):
    for model in (build(f"mnist_adaptive{size}" if size != 5 else "mnist_adaptive", MNIST),
                  build("convnet", MNIST, head="adaptive_max", adaptive_size=size)):
        assert model.classifier[0].in_features == 64 * size * size
        assert model(torch.zeros(2, *MNIST)).shape == (2, 10)


def test_adaptive_head_larger_than_feature_map_is_allowed():
    model = build("convnet", DIGITS, padding="same", head="adaptive_avg", adaptive_size=7)  # features are 2x2
    assert model(torch.zeros(2, *DIGITS)).shape == (2, 10)


def test_registering_a_taken_name_fails():
    with pytest.raises(ValueError, match="convnet"):
        register_model("convnet")(lambda in_shape, num_classes: nn.Identity())
    assert "convnet" in list_models()
