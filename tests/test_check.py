"""search/check.py: a study's models against its data, before any training.

Every bad value is refused by `load_spec` with one line naming the key and, for the limits, both
numbers; a space corner that cannot fit the input stays allowed (the search prunes it).
"""

from __future__ import annotations

import resource
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from search import check
from search.errors import DataError
from search.spec import SpecError, load_spec

STUDY = '[study]\nname = "t"\nn_trials = 3\n'
MNIST = '[data]\ndataset = "mnist"\n'
DIGITS = '[data]\ndataset = "digits"\n'
LR = '[space.lr]\ntype = "float"\nlow = 1e-4\nhigh = 1e-1\nlog = true\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def fixed(model_params: str, extra: str = "") -> str:
    return f'[fixed]\nmodel = "convnet"\n{extra}model_params = {{ {model_params} }}\n'


def choice(name: str, choices: str, extra: str = "") -> str:
    return f'[space.{name}]\ntype = "categorical"\nchoices = [{choices}]\n{extra}'


REFUSED = [
    # (id, file text, how the message starts after the file name, fragments it must hold)
    ("typo in a fixed model param", STUDY + MNIST + fixed("channels = [16, 32], kernal_size = 3") + LR,
     "fixed.model_params.kernal_size: convnet: unknown param 'kernal_size' (valid: channels,", ()),
    ("bad fixed model param value", STUDY + MNIST + fixed('pool = "maxx"') + LR,
     "fixed.model_params.pool: convnet: pool[0] must be one of 'none', 'max', 'avg', got 'maxx'", ()),
    ("fixed model does not fit the input", STUDY + DIGITS + fixed("channels = [8, 8, 8], padding = 0, pool = \"max\"")
     + LR, "fixed.model_params: convnet: block 2 shrinks the 8x8 input to 0x0", ()),
    ("fixed model too large", STUDY + MNIST + fixed("fc = [60000, 60000]") + LR,
     "fixed.model_params: convnet with these params makes a model of 3,696,738,826 parameters",
     ("over study.max_params = 50,000,000",)),
    ("max_params lowered", STUDY + "max_params = 1000\n" + MNIST + fixed("channels = [8]") + LR,
     "fixed.model_params: convnet with these params makes a model of ", ("over study.max_params = 1,000",)),
    ("unknown model param in the space", STUDY + MNIST + choice("kernal_size", "3, 5") + LR,
     "space.kernal_size: 3 makes an invalid model (convnet: unknown param 'kernal_size'", ()),
    ("bad model param choice", STUDY + MNIST + choice("pool", '"max", "maxx"') + LR,
     "space.pool: 'maxx' makes an invalid model (convnet: pool[0] must be one of", ()),
    ("corner over max_params", STUDY + MNIST + fixed("channels = [32, 64], fc = [64]")
     + choice("fc_width", "64, 60000", 'target = "model_params.fc[0]"\n') + LR,
     "space.fc_width: 60000 makes a model of 96,678,826 parameters, over study.max_params = 50,000,000", ()),
    ("corner over max_memory", STUDY + MNIST + choice("batch_size", "64, 100000") + LR,
     "space.batch_size: 100000 needs about ", ("GiB of activations for a training batch of 100000 (an estimate), "
                                               "over study.max_memory = 8 GiB",)),
    ("max_memory as a string", STUDY + 'max_memory = "1MiB"\n' + MNIST + LR,
     "fixed.batch_size: 128 with this model needs about ", ("over study.max_memory = 1 MiB",)),
    ("crop padding over max_memory", STUDY + MNIST + "[fixed]\ncrop_padding = 100000\n" + LR,
     "fixed.crop_padding: 100000 needs about ", ("TiB of activations", "over study.max_memory = 8 GiB")),
    ("largest values together over max_params", STUDY + MNIST + fixed("channels = [32, 64], fc = [64]")
     + choice("channels_2", "64, 128", 'target = "model_params.channels[1]"\n')
     + choice("fc_width", "64, 20000", 'target = "model_params.fc[0]"\n') + LR,
     "space: the largest values together (channels_2 = 128, fc_width = 20000) make a model of 64,",
     ("over study.max_params = 50,000,000",)),
    ("enqueued config does not fit", STUDY + DIGITS + fixed('channels = [4, 4, 4, 4], padding = 1, pool = "none"')
     + choice("pool", '"none", "max"') + LR + '[[enqueue]]\npool = "max"\n',
     "enqueue[0]: convnet: block 4 shrinks the 8x8 input to 0x0", ()),
    ("no corner fits", STUDY + DIGITS + fixed('channels = [4, 4, 4, 4], padding = 1, pool = "none"')
     + choice("pool", '"max", "avg"') + LR,
     "space: no configuration tried (every choice and both ends of every range) fits the 8x8 input", ("rejected",)),
    ("two values that cannot meet", STUDY + MNIST + choice("optimizer", '"sgd", "adam"')
     + '[space.momentum]\ntype = "float"\nlow = 0.5\nhigh = 0.9\nwhen = { optimizer = ["sgd"] }\n'
     + choice("nesterov", "false, true") + LR,
     "space.nesterov: True with optimizer = 'adam' makes an invalid config (nesterov: needs optimizer 'sgd'",
     ("a when condition",)),
    ("batch of one with batchnorm on 1x1 maps", STUDY + MNIST
     + fixed('channels = [4, 4, 4, 4, 4], padding = 1, batchnorm = true, pool = ["max", "max", "max", "max", "none"]',
             "batch_size = 1\n") + LR,
     "fixed.batch_size: convnet: batchnorm needs more than one value per channel in a training batch", ()),
    ("bad data option", STUDY + '[data]\ndataset = "synthetic"\ndata_options = { n = -1 }\n' + LR,
     "data.data_options.n: expected an integer >= 1, got -1", ()),
    ("unknown data option", STUDY + '[data]\ndataset = "synthetic"\ndata_options = { size = 8, colour = 1 }\n' + LR,
     "data.data_options: unknown key 'colour' for synthetic", ()),
    ("missing image folder", STUDY + '[data]\ndataset = "folder"\ndata_options = { path = "/nonexistent/pets" }\n' + LR,
     "data.data_options.path: image folder /nonexistent/pets does not exist", ()),
]


@pytest.mark.parametrize("text,start,fragments", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_values_are_one_line_naming_the_key(tmp_path, text, start, fragments):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {start}"), message
    assert all(f in message for f in fragments), message
    assert "\n" not in message


def test_a_corner_that_cannot_fit_is_left_to_the_search(tmp_path):
    """Four poolings on 8x8 is a point of the space, pruned as "rejected" at trial time (on purpose)."""
    spec = load_spec(write(tmp_path, STUDY + DIGITS + fixed('channels = [4, 4, 4, 4], padding = 1, pool = "none"')
                           + choice("pool", '"none", "max"') + LR))
    assert [p.name for p in spec.space] == ["pool", "lr"]


def test_the_default_config_is_checked_and_fits(tmp_path):
    """No [data] or [fixed]: the default convnet on 8x8 digits (it pads where it must)."""
    info = check.check_spec(load_spec(write(tmp_path, STUDY + LR)))
    assert (info.in_shape, info.num_classes) == ((1, 8, 8), 10)
    assert 0 < info.max_params < 100_000


def test_limits_in_the_study_section_round_trip(tmp_path):
    from search.spec import spec_from_dict, spec_to_dict

    spec = load_spec(write(tmp_path, STUDY + 'max_params = 2000000\nmax_memory = "512MiB"\n' + LR))
    assert (spec.max_params, spec.max_memory) == (2_000_000, 512 * 2**20)
    stored = spec_to_dict(spec)
    assert stored["study"]["max_params"] == 2_000_000 and stored["study"]["max_memory"] == 512 * 2**20
    assert spec_from_dict(stored) == spec
    default = spec_to_dict(load_spec(write(tmp_path, STUDY + LR)))
    assert "max_params" not in default["study"] and "max_memory" not in default["study"]  # as stored before


def test_models_are_built_on_the_meta_device():
    """A 3.6-billion-parameter model (14 GB in fp32) is measured without allocating it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = SimpleNamespace(model="convnet", model_params={"fc": [60000, 60000]}, batch_size=128, crop_padding=0)
    size = check.footprint(cfg, (1, 28, 28), 10)
    assert size.params == 3_696_738_826
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: far below 14 GB


def _real_activations(cfg, in_shape, num_classes):
    """The estimate's formula on a real CPU forward pass (no meta device, no shortcuts)."""
    from models import build_model

    model = build_model(cfg, in_shape, num_classes).train()
    outputs = []
    for m in model.modules():
        if not list(m.children()):
            m.register_forward_hook(lambda mod, i, out: outputs.append(out.numel()))
    model(torch.randn(cfg.batch_size, *in_shape))
    return 4 * (2 * sum(outputs) + cfg.batch_size * in_shape[0] * in_shape[1] * in_shape[2])


@pytest.mark.parametrize("model,params,in_shape", [
    ("convnet", {}, (1, 8, 8)),
    ("convnet", {"channels": [4, 8], "batchnorm": True, "activation": "gelu", "head": "adaptive_max",
                 "adaptive_size": 3, "dropout": 0.2, "dropout2d": True, "fc": [16, 8], "fc_dropout": 0.1}, (3, 12, 12)),
    ("lenet5", {}, (1, 28, 28)),
    ("cifar_threeconv_bn", {}, (3, 32, 32)),
    ("alexnet", {}, (3, 32, 32)),
])
def test_the_meta_pass_sees_what_a_real_forward_pass_sees(model, params, in_shape):
    cfg = SimpleNamespace(model=model, model_params=params, batch_size=3, crop_padding=0)
    from models import build_model, count_parameters

    size = check.footprint(cfg, in_shape, 7)
    assert size.params == count_parameters(build_model(cfg, in_shape, 7))
    assert size.activation_bytes == _real_activations(cfg, in_shape, 7)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@settings(max_examples=60, deadline=None)
@given(params=st.fixed_dictionaries({
    "channels": st.lists(st.integers(1, 6), min_size=1, max_size=3),
    "convs": st.integers(1, 2), "kernel_size": st.integers(1, 5),
    "padding": st.sampled_from([0, 1, 2, "same"]), "pool": st.sampled_from(["none", "max", "avg"]),
    "pool_size": st.integers(1, 3), "batchnorm": st.booleans(), "activation": st.sampled_from(["relu", "gelu"]),
    "head": st.sampled_from(["flatten", "adaptive_avg", "adaptive_max"]), "adaptive_size": st.integers(1, 4),
    "fc": st.lists(st.integers(1, 9), max_size=2), "dropout": st.sampled_from([0.0, 0.3])}),
    side=st.integers(3, 20), channels=st.sampled_from([1, 3]), batch=st.integers(2, 4))
def test_the_shapes_the_check_computes_are_torchs(params, side, channels, batch):
    """The meta pass computes the common layers' shapes itself (torch's meta kernels import
    torch._dynamo and sympy, seconds once per process); a real forward pass must agree."""
    from models import ModelShapeError, build_model, count_parameters

    cfg = SimpleNamespace(model="convnet", model_params=params, batch_size=batch, crop_padding=0)
    in_shape = (channels, side, side)
    try:
        real = build_model(cfg, in_shape, 5)
    except ModelShapeError:
        with pytest.raises(ModelShapeError):
            check.footprint(cfg, in_shape, 5)
        return
    size = check.footprint(cfg, in_shape, 5)
    assert size.params == count_parameters(real)
    assert size.activation_bytes == _real_activations(cfg, in_shape, 5)


def test_the_estimate_counts_the_padded_batch():
    cfg = SimpleNamespace(model="convnet", model_params={"channels": [4]}, batch_size=2, crop_padding=0)
    plain = check.footprint(cfg, (1, 8, 8), 10)
    padded = check.footprint(SimpleNamespace(**{**vars(cfg), "crop_padding": 4}), (1, 8, 8), 10)
    assert padded.activation_bytes - plain.activation_bytes == 4 * 2 * 1 * 16 * 16


@pytest.mark.parametrize("text,expected", [
    (8 * 2**30, 8 * 2**30), ("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5kib", 1536),
    ("100", 100), (0, None), (-1, None), (True, None), ("lots", None), ("8 GiBs", None), (1.5, None), ("", None),
])
def test_parse_bytes(text, expected):
    assert check.parse_bytes(text) == expected


def test_format_bytes():
    assert [check.format_bytes(n) for n in (512, 1536, 8 * 2**30, 3 * 2**40)] == ["512 B", "1.5 KiB", "8 GiB", "3 TiB"]


# --- the data on this machine, for create ------------------------------------------------------------


def test_absent_files_are_a_warning_not_an_error(tmp_path):
    classes, warnings = check.data_here({"dataset": "mnist", "data_dir": str(tmp_path)})
    assert classes is None and len(warnings) == 1
    assert warnings[0].startswith(f"mnist not found in {tmp_path} (looked for MNIST/raw/train-images-idx3-ubyte[.gz]);")
    assert check.data_here({"dataset": "mnist", "data_dir": str(tmp_path), "download": True}) == (None, ())
    assert check.data_here({"dataset": "digits"}) == (None, ())
    assert check.data_here({"dataset": "cifar10", "data_dir": str(tmp_path)})[1][0].startswith("cifar10 not found")


def test_mnist_in_the_data_dir_gives_no_warning(shared_datasets):
    assert check.data_here({"dataset": "mnist", "data_dir": str(shared_datasets / "mnist")}) == (None, ())


def test_a_folder_is_listed_and_a_missing_one_is_an_error(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "pets" / name / f"{i}.png")
    options = {"path": str(tmp_path / "pets"), "image_size": 8}
    assert check.data_here({"dataset": "folder", "data_options": options}) == (("cat", "dog"), ())
    with pytest.raises(DataError, match="does not exist"):
        check.data_here({"dataset": "folder", "data_options": {"path": str(tmp_path / "nope")}})


def test_create_warns_when_the_budget_leaves_the_sampler_or_pruner_nothing_to_do():
    """`--set study.n_trials=10` on a TPE with 10 start-up trials never leaves random search;
    `fixed.epochs=3` with 2 warm-up steps prunes only after the last epoch."""
    from search.check import budget_warnings
    from search.spec import load_spec

    shipped = load_spec("studies/mnist_pooling.toml")
    assert budget_warnings(shipped) == ()
    small = load_spec("studies/mnist_pooling.toml", ["study.n_trials=10", "fixed.epochs=3"])
    lines = [w for w in budget_warnings(small) if "step_size" not in w]  # those: the test below
    assert len(lines) == 2
    assert lines[0].startswith("sampler.kwargs.n_startup_trials: 10 random start-up trials take the whole budget of 10")
    assert lines[1].startswith("pruner.kwargs.n_warmup_steps: 2 steps of warm-up with at most 3 epochs")
    patient = load_spec("studies/mnist_pooling.toml", ["study.n_trials=4", "sampler.kwargs.n_startup_trials=2"])
    assert [w.split(":")[0] for w in budget_warnings(patient)] == ["pruner.kwargs.n_startup_trials"]


@pytest.mark.parametrize("study, sets, expected", [
    # the three-conv study's 40-epoch range and hand-tuned start cut to 8-epoch trials (a CPU budget)
    ("cifar10_threeconv", ["fixed.epochs=8", "pruner.kwargs.max_resource=8"],
     ["space.step_size: step_size 10 to 30 never steps in a trial of at most 8 epochs",
      "enqueue[0]: step_size 20 never steps in a trial of at most 8 epochs"]),
    ("mnist_convfc", ["fixed.epochs=3"], ["space.step_size: step_size 3 to 4 never steps in a trial of at most 3",
                                          "enqueue[1]: step_size 4 never steps in a trial of at most 3"]),
    ("mnist_convfc", ["fixed.epochs=4"], ["space.step_size: step_size 4 never steps in a trial of at most 4",
                                          "enqueue[1]: step_size 4 never steps in a trial of at most 4"]),
    ("mnist_convfc", ["space.step_size.high=12"],
     ["space.step_size: step_size 8 to 12 never steps in a trial of at most 8"]),
    ("mnist_convfc", [], []),
    ("digits_quick", ["fixed.scheduler=\"step\"", "fixed.step_size=8"],
     ["fixed.step_size: 8 never steps in a trial of at most 8 epochs"]),
    ("digits_quick", ["fixed.step_size=8"], []),  # no StepLR in this study: the key is never used
])
def test_create_warns_when_a_steplr_step_never_comes_within_a_trial(study, sets, expected):
    """StepLR with a step_size of at least the trial's epochs trains at a constant lr: ranked so by
    the search and kept so by the final stage's stretched schedule (a 14-trial three-conv CPU run
    with 8-epoch trials: 3 of its 5 StepLR trials, the chosen one among them, never stepped)."""
    from search.check import budget_warnings
    from search.spec import load_spec

    lines = [w for w in budget_warnings(load_spec(f"studies/{study}.toml", sets)) if "step_size" in w]
    assert len(lines) == len(expected) and all(w.startswith(e) for w, e in zip(lines, expected)), lines


@pytest.mark.parametrize("drop, left", [(["batch_size"], "batch_size"),
                                        (["optimizer"], "optimizer"),          # a parent: its child is not asked
                                        (["dropout_1", "dropout_3"], "dropout_1, dropout_3")])
def test_create_warns_when_a_start_leaves_a_parameter_to_the_sampler(tmp_path, drop, left):
    """A start without batch_size is legal (Optuna draws it), but then it is not what the user
    wrote down and each run draws it anew: the three-conv starts did so for four runs."""
    import re

    from typer.testing import CliRunner

    from search.check import start_warnings
    from search.cli import app
    from search.spec import load_spec

    text = Path("studies/cifar10_threeconv.toml").read_text()
    first, _, rest = text.partition("\n[[enqueue]]")
    start, _, second = rest.partition("\n[[enqueue]]")
    for name in drop:
        start = re.sub(rf"(?m)^{name} = .*\n", "", start)
    path = tmp_path / "cifar10_threeconv.toml"
    path.write_text(first + "\n[[enqueue]]" + start + "\n[[enqueue]]" + second)
    spec = load_spec(path)
    assert start_warnings(load_spec("studies/cifar10_threeconv.toml")) == ()
    lines = start_warnings(spec)
    assert len(lines) == 1 and lines[0].startswith(f"enqueue[0]: leaves {left} to the sampler")
    result = CliRunner().invoke(app, ["create", str(path), "--storage", f"sqlite:///{tmp_path}/s.db",
                                      "--set", "data.dataset=synthetic", "--set",
                                      'data.data_options={"channels": 3, "size": 32, "classes": 10}'])
    assert result.exit_code == 0, result.output
    assert f"warning: enqueue[0]: leaves {left} to the sampler" in result.output
