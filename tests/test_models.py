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
    yield "convnet", DIGITS, {"channels": [4, 8], "convs": [2, 1], "padding": 1, "block_order": "conv_act_dropout_bn_pool",
                              "batchnorm": True, "dropout": [0.1, 0.0], "fc": [16, 8], "fc_batchnorm": True}


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
    # the notebook's final network: a BatchNorm2d per conv and a BatchNorm1d after the fc 100
    "cifar_threeconv_bn": THREECONV + bn(16) + bn(32) + bn(64) + bn(100),
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
    assert EXPECTED_PARAMS["cifar_threeconv"] == 434_294
    assert EXPECTED_PARAMS["cifar_threeconv_bn"] == 434_718  # the three-conv notebook's final network
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


def test_width_scales_every_conv_and_hidden_fc_and_keeps_the_layout():
    """cifar_sixconv (32/64/128 channels, two convs a block, fc 128) at width 0.5 and 1.5."""
    for width, (c1, c2, c3, f) in ((0.5, (16, 32, 64, 64)), (1.5, (48, 96, 192, 192))):
        expected = (conv(3, c1) + conv(c1, c1) + conv(c1, c2) + conv(c2, c2) + conv(c2, c3) + conv(c3, c3)
                    + linear(c3 * 4 * 4, f) + linear(f, 10))
        assert count_parameters(build("cifar_sixconv", CIFAR, width=width)) == expected
    assert count_parameters(build("cifar_sixconv", CIFAR, width=1)) == EXPECTED_PARAMS["cifar_sixconv"]
    assert count_parameters(build("convnet", DIGITS, channels=[2], fc=[3], width=0.1)) == (
        conv(1, 1) + linear(1 * 3 * 3, 1) + linear(1, 10))  # rounded, never below one


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
    ("convnet", {"fc_batchnorm": 1}, "fc_batchnorm"),
    ("convnet", {"block_order": "conv_act_bn_pool"}, "block_order"),
    ("cifar_threeconv_bn", {"block_order": None}, "block_order"),
    ("convnet", {"chanels": [8]}, "chanels"),
    ("convnet", {"width": 0}, "width"),
    ("convnet", {"width": "wide"}, "width"),
    ("cifar_sixconv", {"width": float("inf")}, "width"),
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
    for name, params in [("cifar_sixconv_bn", {}), ("cifar_threeconv_bn", {}), ("convnet", {"batchnorm": True}),
                         ("convnet", {"batchnorm": True, "block_order": "conv_act_dropout_bn_pool", "convs": 2})]:
        model = build(name, **params)
        layers = list(model.features)  # a plain list keeps repeats, unlike model.modules()
        convs = [m for m in layers if isinstance(m, nn.Conv2d)]
        norms = [m for m in layers if isinstance(m, nn.BatchNorm2d)]
        assert len(norms) == len(convs) > 0
        assert len({id(m) for m in norms}) == len(norms), "a BatchNorm2d is shared between convs"
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):  # the next norm, before any other conv, is this conv's
                following = [m for m in layers[i + 1:] if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
                assert isinstance(following[0], nn.BatchNorm2d), f"{name}: conv {i} has no batchnorm of its own"
                assert following[0].num_features == layer.out_channels


def _notebook_threeconv_bn() -> nn.Sequential:
    """The three-conv notebook's final network, typed out by hand as the notebook has it."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.LeakyReLU(), nn.Dropout2d(0.2), nn.BatchNorm2d(cout)]

    return nn.Sequential(
        *block(3, 16),
        *block(16, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.MaxPool2d(2),  # 32 -> 32 -> 16 -> 8: 64 * 8 * 8 = 4096 features
        nn.Flatten(),
        nn.Linear(4096, 100), nn.LeakyReLU(), nn.Dropout(0.2), nn.BatchNorm1d(100),
        nn.Linear(100, 10),
    )


def _layer_signature(model: nn.Module) -> list[tuple]:
    """Every leaf layer in order, with the hyperparameters that define it."""
    keys = {
        nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"),
        nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
        nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
        nn.Linear: ("in_features", "out_features"),
        nn.LeakyReLU: ("negative_slope",),
        nn.Dropout: ("p",), nn.Dropout2d: ("p",),
        nn.MaxPool2d: ("kernel_size", "stride", "padding", "ceil_mode"),
        nn.Flatten: ("start_dim", "end_dim"),
    }
    leaves = [m for m in model.modules() if not list(m.children())]
    unknown = {type(m).__name__ for m in leaves} - {t.__name__ for t in keys}
    assert not unknown, f"no signature for {unknown}"
    return [(type(m).__name__, *((k, getattr(m, k)) for k in keys[type(m)])) for m in leaves]


def test_cifar_threeconv_bn_is_the_notebooks_final_network():
    torch.manual_seed(0)
    notebook, preset = _notebook_threeconv_bn(), build("cifar_threeconv_bn")
    assert count_parameters(notebook) == count_parameters(preset) == 434_718
    assert _layer_signature(preset) == _layer_signature(notebook)
    assert [t.shape for t in preset.state_dict().values()] == [t.shape for t in notebook.state_dict().values()]
    # Same weights, same function: copy the hand-built net's state into the preset by position.
    preset.load_state_dict(dict(zip(preset.state_dict(), notebook.state_dict().values())))
    x = torch.randn(4, *CIFAR)
    with torch.no_grad():
        assert torch.allclose(preset.eval()(x), notebook.eval()(x))


def test_cifar_threeconv_bn_keeps_its_search_options():
    """Overrides still reach the notebook-order layers; batchnorm and fc_batchnorm switch the
    2d and 1d norms off independently."""
    model = build("cifar_threeconv_bn", dropout=[0.0, 0.3, 0.4], fc_dropout=0.5)
    assert [m.p for m in model.features if isinstance(m, nn.Dropout2d)] == [0.3, 0.4]
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.5]
    model = build("cifar_threeconv_bn", batchnorm=False, fc_batchnorm=False)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    assert count_parameters(model) == THREECONV
    assert count_parameters(build("cifar_threeconv_bn", fc=[64])) == (
        conv(3, 16) + conv(16, 32) + conv(32, 64) + bn(16) + bn(32) + bn(64)
        + linear(64 * 8 * 8, 64) + bn(64) + linear(64, 10))
    # The old conv -> bn -> act layout is one override away (and is what cifar_threeconv + batchnorm gives).
    old = build("cifar_threeconv_bn", block_order="conv_bn_act_pool_dropout", dropout=[0.0, 0.2, 0.2],
                fc_dropout=0.0, fc_batchnorm=False)
    assert _layer_signature(old) == _layer_signature(build("cifar_threeconv", batchnorm=True))
    assert count_parameters(old) == 434_518


# Variations every convnet-based model accepts: each adds or moves modules that could be shared.
SHARING_VARIATIONS = [
    {},
    {"batchnorm": True},
    {"batchnorm": True, "fc_batchnorm": True, "fc_dropout": 0.1},
    {"batchnorm": True, "block_order": "conv_act_dropout_bn_pool", "dropout": 0.1, "dropout2d": True},
    {"batchnorm": True, "convs": 2, "dropout": 0.1},
]


def _sharing_cases():
    for name in list_models():
        shapes = [MNIST] if name.startswith("mnist_") else [CIFAR] if name.startswith("cifar_") else [DIGITS, CIFAR]
        for in_shape in shapes:
            for params in SHARING_VARIATIONS:
                yield name, in_shape, params


def assert_nothing_shared(model: nn.Module) -> None:
    """No module object in two places, no parameter or buffer tensor (or its storage) in two places."""
    seen: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        assert id(module) not in seen, f"module {path or '<root>'} is the same object as {seen[id(module)] or '<root>'}"
        seen[id(module)] = path
    for kind, tensors in (("parameter", model.named_parameters(remove_duplicate=False)),
                          ("buffer", model.named_buffers(remove_duplicate=False))):
        ids: dict[int, str] = {}
        storages: dict[int, str] = {}
        for path, t in tensors:
            assert id(t) not in ids, f"{kind} {path} is the same tensor as {ids[id(t)]}"
            ids[id(t)] = path
            if t.numel():
                ptr = t.untyped_storage().data_ptr()
                assert ptr not in storages, f"{kind} {path} shares storage with {storages[ptr]}"
                storages[ptr] = path


def test_the_sharing_check_catches_a_shared_batchnorm():
    """The seed notebooks' bug: one BatchNorm2d object used after two convs."""
    norm = nn.BatchNorm2d(8)
    with pytest.raises(AssertionError, match="same object"):
        assert_nothing_shared(nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.ReLU(), nn.Conv2d(8, 8, 3), norm))
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(AssertionError, match="same tensor"):
        assert_nothing_shared(tied)
    views = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    views[1].weight = nn.Parameter(views[0].weight.detach())  # a new Parameter on the same storage
    with pytest.raises(AssertionError, match="shares storage"):
        assert_nothing_shared(views)


def test_every_cifar_preset_is_covered_by_the_sharing_check():
    cifar = {name for name, _, _ in _sharing_cases() if name.startswith("cifar_")}
    assert {"cifar_sixconv", "cifar_sixconv_dropout", "cifar_sixconv_bn", "cifar_threeconv",
            "cifar_threeconv_bn"} <= cifar
    assert set(list_models()) == {name for name, _, _ in _sharing_cases()}


@pytest.mark.parametrize("name,in_shape,params", list(_sharing_cases()), ids=lambda v: str(v))
def test_no_model_shares_a_module_or_parameter(name, in_shape, params):
    assert_nothing_shared(build(name, in_shape, **params))


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
