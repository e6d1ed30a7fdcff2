"""Study files: every shipped study loads, specs round-trip through JSON, and every mistake is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search import check, config
from search.space import contains, is_active, suggest_params
from search.spec import SpecError, StudySpec, load_spec, make_pruner, make_sampler, spec_from_dict, spec_to_dict

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.toml"))

STUDY = '[study]\nname = "t"\nn_trials = 3\n'
LR = '[space.lr]\ntype = "float"\nlow = 1e-4\nhigh = 1e-1\nlog = true\n'
OPT = '[space.optimizer]\ntype = "categorical"\nchoices = ["sgd", "adam"]\n'
MOMENTUM = '[space.momentum]\ntype = "float"\nlow = 0.5\nhigh = 0.9\nwhen = { optimizer = ["sgd"] }\n'
POOLS = '[fixed]\nmodel_params = { channels = [8, 16], pool = ["max", "max"] }\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_all_shipped_studies_are_found():
    names = {p.stem for p in STUDIES}
    assert {"digits_quick", "mnist_convfc", "mnist_pooling", "mnist_adaptive", "cifar10_sixconv",
            "cifar10_threeconv", "cifar10_jpeg_sixconv"} <= names


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_shipped_study_loads_and_round_trips_through_json(path, monkeypatch, request):
    if 'dataset = "folder"' in path.read_text():  # load_spec lists the folder: its class count shapes the model
        monkeypatch.setenv("CNNSEARCH_DATA", str(request.getfixturevalue("shared_datasets")))
    spec = load_spec(path)
    assert isinstance(spec, StudySpec) and spec.name == path.stem
    assert path.read_text().startswith(f"# {path.stem}:"), "each study opens with a comment saying what it is for"
    stored = json.loads(json.dumps(spec_to_dict(spec)))
    again = spec_from_dict(stored)
    assert again == spec
    assert spec_to_dict(again) == spec_to_dict(load_spec(path))  # equal specs give equal dicts
    assert check.start_warnings(spec) == ()  # a start is what its file says: nothing of it is drawn


@pytest.mark.parametrize("stem", ["cifar10_sixconv", "cifar10_threeconv"])
def test_cifar_studies_search_what_the_notebooks_tried_and_what_makes_small_nets_good(stem):
    """Issue 16: the notebooks' knobs plus augmentation, schedules, weight decay, batch and width."""
    spec = load_spec(Path(__file__).parent.parent / "studies" / f"{stem}.toml")
    by_name = {p.name: p for p in spec.space}
    wanted = {"lr", "optimizer", "momentum", "scheduler", "step_size", "step_gamma", "batchnorm",
              "dropout_1", "dropout_2", "dropout_3", "flip", "crop_padding", "erasing", "label_smoothing",
              "weight_decay", "batch_size", "width"}
    assert wanted <= set(by_name), f"{stem} does not search {sorted(wanted - set(by_name))}"
    assert {"sgd", "adam", "adamw"} <= set(by_name["optimizer"].choices)
    assert {"step", "cosine", "onecycle"} <= set(by_name["scheduler"].choices)
    assert 4 in by_name["crop_padding"].choices and True in by_name["flip"].choices
    assert by_name["width"].target == "model_params.width" and len(by_name["width"].choices) > 1


def test_minimal_study_gets_defaults(tmp_path):
    spec = load_spec(write(tmp_path, STUDY + LR))
    assert (spec.direction, spec.metric, spec.timeout, spec.description) == ("maximize", "val_acc", None, "")
    assert (spec.sampler.name, spec.pruner.name) == ("TPESampler", "MedianPruner")
    assert spec.space[0].target == "lr"


def test_val_loss_defaults_to_minimize(tmp_path):
    spec = load_spec(write(tmp_path, STUDY + 'metric = "val_loss"\n' + LR))
    assert spec.direction == "minimize"


def test_default_targets_and_dependency_order(tmp_path):
    # momentum is written before the parameter it depends on; it must still come after it
    spec = load_spec(write(tmp_path, STUDY + MOMENTUM + OPT + '[space.dropout]\ntype = "float"\nlow = 0\nhigh = 0.5\n'))
    assert [p.name for p in spec.space] == ["optimizer", "momentum", "dropout"]
    assert {p.name: p.target for p in spec.space} == {
        "optimizer": "optimizer", "momentum": "momentum", "dropout": "model_params.dropout"}


def test_spec_does_not_share_state_with_the_dict_it_came_from(tmp_path):
    doc = spec_to_dict(load_spec(write(tmp_path, STUDY + POOLS + LR)))
    spec = spec_from_dict(doc)
    doc["fixed"]["model_params"]["pool"][0] = "avg"
    assert spec.fixed["model_params"]["pool"] == ["max", "max"]


def test_stored_spec_errors_name_their_source():
    with pytest.raises(SpecError, match=r"^study user attrs: study.n_trials: "):
        spec_from_dict({"study": {"name": "t", "n_trials": 0}, "space": {}}, source="study user attrs")


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.toml: no such file$"):
        load_spec(tmp_path / "nope.toml")


def test_not_toml(tmp_path):
    with pytest.raises(SpecError, match=r"study\.toml: not valid TOML") as info:
        load_spec(write(tmp_path, "[study\nname = 1\n"))
    assert "\n" not in str(info.value)


INVALID = [
    # (id, file text, the key the message must name, a word of what was expected)
    ("unknown section", STUDY + LR + "[studdy]\nx = 1\n", "studdy", "valid: study"),
    ("unknown study key", STUDY + "n_trial = 3\n" + LR, "study.n_trial", "valid: name"),
    ("no name", '[study]\nn_trials = 3\n' + LR, "study.name", "None"),
    ("bad name", STUDY.replace('"t"', '"a b"') + LR, "study.name", "'a b'"),
    ("zero trials", STUDY.replace("3", "0") + LR, "study.n_trials", ">= 1"),
    ("string trials", STUDY.replace("3", '"3"') + LR, "study.n_trials", "'3'"),
    ("bad metric", STUDY + 'metric = "acc"\n' + LR, "study.metric", "val_acc"),
    ("wrong direction", STUDY + 'metric = "val_loss"\ndirection = "maximize"\n' + LR, "study.direction", "minimize"),
    ("bad timeout", STUDY + "timeout = -1\n" + LR, "study.timeout", "> 0"),
    ("nan timeout", STUDY + "timeout = nan\n" + LR, "study.timeout", "got nan"),
    ("infinite timeout", STUDY + "timeout = inf\n" + LR, "study.timeout", "got inf"),
    ("zero max_params", STUDY + "max_params = 0\n" + LR, "study.max_params", ">= 1"),
    ("float max_params", STUDY + "max_params = 1e9\n" + LR, "study.max_params", "integer"),
    ("bad max_memory", STUDY + 'max_memory = "lots"\n' + LR, "study.max_memory", '"8GiB"'),
    ("zero max_memory", STUDY + "max_memory = 0\n" + LR, "study.max_memory", "got 0"),
    ("unknown data key", STUDY + "[data]\nsize = 3\n" + LR, "data.size", "valid: dataset"),
    ("fixed key in data", STUDY + "[data]\nlr = 0.1\n" + LR, "data.lr", "[fixed]"),
    ("data key in fixed", STUDY + '[fixed]\ndataset = "mnist"\n' + LR, "fixed.dataset", "[data]"),
    ("unknown fixed key", STUDY + "[fixed]\nepoch = 3\n" + LR, "fixed.epoch", "valid: model"),
    ("unknown dataset", STUDY + '[data]\ndataset = "imagenet"\n' + LR, "data.dataset", "'imagenet'"),
    ("unknown model", STUDY + '[fixed]\nmodel = "resnet"\n' + LR, "fixed.model", "'resnet'"),
    ("unknown optimizer", STUDY + '[fixed]\noptimizer = "adagrad"\n' + LR, "fixed.optimizer", "adagrad"),
    ("wrong fixed type", STUDY + '[fixed]\nepochs = "ten"\n' + LR, "fixed.epochs", "int"),
    ("bad fixed value", STUDY + "[fixed]\nepochs = 0\n" + LR, "fixed.epochs", "> 0"),
    ("bad data value", STUDY + "[data]\nval_fraction = 1.5\n" + LR, "data.val_fraction", "[0, 1)"),
    ("nesterov without sgd", STUDY + "[fixed]\nnesterov = true\n" + LR, "fixed.nesterov", "sgd"),
    ("model_params not a table", STUDY + "[fixed]\nmodel_params = 3\n" + LR, "fixed.model_params", "table"),
    ("date value", STUDY + "[fixed]\nmodel_params = { a = 1979-05-27 }\n" + LR, "fixed.model_params.a", "number"),
    ("empty space", STUDY, "space", "at least one"),
    ("space not a table", "space = 3\n" + STUDY, "space", "table"),
    ("param not a table", STUDY + "[space]\nlr = 3\n", "space.lr", "table"),
    ("bad param name", STUDY + '[space."a-b"]\ntype = "float"\nlow = 0\nhigh = 1\n', "space.a-b", "letters"),
    ("unknown param key", STUDY + LR + "lo = 3\n", "space.lr.lo", "valid: choices"),
    ("unknown type", STUDY + '[space.x]\ntype = "bool"\n', "space.x.type", "categorical"),
    ("choices on a float", STUDY + LR + "choices = [1]\n", "space.lr.choices", "not used"),
    ("low not a number", STUDY + '[space.x]\ntype = "float"\nlow = "a"\nhigh = 1\n', "space.x.low", "number"),
    ("float low for int", STUDY + '[space.x]\ntype = "int"\nlow = 1.5\nhigh = 4\n', "space.x.low", "integer"),
    ("low above high", STUDY + '[space.x]\ntype = "float"\nlow = 2\nhigh = 1\n', "space.x.low", "<= high"),
    ("log with low 0", STUDY + '[space.lr]\ntype = "float"\nlow = 0\nhigh = 1\nlog = true\n', "space.lr.low",
     "must be > 0 when log = true, got 0"),
    ("log not a bool", STUDY + '[space.lr]\ntype = "float"\nlow = 1\nhigh = 2\nlog = 1\n', "space.lr.log", "true or false"),
    ("step with log", STUDY + LR + "step = 0.01\n", "space.lr.step", "log"),
    ("negative step", STUDY + '[space.n]\ntype = "int"\nlow = 1\nhigh = 9\nstep = -2\n', "space.n.step", "positive"),
    ("step off the range", STUDY + '[space.n]\ntype = "int"\nlow = 1\nhigh = 8\nstep = 2\n', "space.n.step",
     "multiple"),
    ("empty choices", STUDY + '[space.optimizer]\ntype = "categorical"\nchoices = []\n', "space.optimizer.choices",
     "non-empty"),
    ("duplicate choices", STUDY + '[space.optimizer]\ntype = "categorical"\nchoices = ["sgd", "sgd"]\n',
     "space.optimizer.choices", "twice"),
    ("list choice", STUDY + '[space.channels]\ntype = "categorical"\nchoices = [[1, 2]]\n', "space.channels.choices",
     "finite numbers"),
    ("nan choice", STUDY + '[space.x]\ntype = "categorical"\nchoices = [1.0, nan]\n', "space.x.choices", "finite"),
    ("1 and true collide", STUDY + '[space.x]\ntype = "categorical"\nchoices = [1, true]\n', "space.x.choices",
     "twice"),
    ("infinite high", STUDY + '[space.x]\ntype = "float"\nlow = 0\nhigh = inf\n', "space.x.high", "finite"),
    ("infinite fixed value", STUDY + "[fixed]\nmodel_params = { fc_dropout = nan }\n" + LR,
     "fixed.model_params.fc_dropout", "finite"),
    ("unknown optimizer choice", STUDY + '[space.optimizer]\ntype = "categorical"\nchoices = ["sgd", "adagrad"]\n',
     "space.optimizer", "adagrad"),
    ("unknown scheduler choice", STUDY + '[space.scheduler]\ntype = "categorical"\nchoices = ["step", "cyclic"]\n',
     "space.scheduler", "cyclic"),
    ("unknown model choice", STUDY + '[space.model]\ntype = "categorical"\nchoices = ["convnet", "vgg99"]\n',
     "space.model.choices", "vgg99"),
    ("range outside RunConfig", STUDY + '[space.step_gamma]\ntype = "float"\nlow = 0.0\nhigh = 0.5\n',
     "space.step_gamma", "(0, 1]"),
    ("float for an int field", STUDY + '[space.epochs]\ntype = "float"\nlow = 1\nhigh = 5\n', "space.epochs", "int"),
    ("when on a missing param", STUDY + OPT + MOMENTUM.replace("optimizer =", "optimiser ="),
     "space.momentum.when.optimiser", "no such parameter"),
    ("when value never taken", STUDY + OPT + MOMENTUM.replace('["sgd"]', '["sdg"]'), "space.momentum.when.optimizer",
     "never be 'sdg'"),
    ("when value out of int range", STUDY + '[space.n]\ntype = "int"\nlow = 1\nhigh = 3\n' + MOMENTUM.replace(
        'optimizer = ["sgd"]', "n = [7]"), "space.momentum.when.n", "never be 7"),
    ("when on a float", STUDY + LR + MOMENTUM.replace('optimizer = ["sgd"]', "lr = [0.1]"), "space.momentum.when.lr",
     "categorical or int"),
    ("when empty", STUDY + OPT + MOMENTUM.replace('["sgd"]', "[]"), "space.momentum.when.optimizer", "at least one"),
    ("when cycle", STUDY + '[space.a]\ntype = "categorical"\nchoices = [1, 2]\nwhen = { b = [1] }\n'
     '[space.b]\ntype = "categorical"\nchoices = [1, 2]\nwhen = { a = [1] }\n', "space.a.when", "cycle"),
    ("when on itself", STUDY + '[space.a]\ntype = "categorical"\nchoices = [1, 2]\nwhen = { a = [1] }\n',
     "space.a.when", "cycle"),
    ("target not a field", STUDY + LR + 'target = "learning_rate"\n', "space.lr.target", "not a RunConfig field"),
    ("target a data field", STUDY + '[space.subset]\ntype = "int"\nlow = 100\nhigh = 1000\n', "space.subset.target",
     "data field"),
    ("target a whole table", STUDY + LR + 'target = "model_params"\n', "space.lr.target", "model_params.<key>"),
    ("target a key of a scalar", STUDY + LR + 'target = "optimizer.lr"\n', "space.lr.target", "only model_params"),
    ("index of an undefined list", STUDY + '[space.pool_1]\ntype = "categorical"\nchoices = ["max", "avg"]\n'
     'target = "model_params.pool[0]"\n', "space.pool_1.target", "must define as a list"),
    ("index past the end", STUDY + POOLS + '[space.pool_3]\ntype = "categorical"\nchoices = ["max", "avg"]\n'
     'target = "model_params.pool[2]"\n', "space.pool_3.target", "past the end"),
    ("two params one target", STUDY + LR + '[space.lr2]\ntype = "float"\nlow = 1e-3\nhigh = 1e-2\ntarget = "lr"\n',
     "space.lr2.target", "overlaps the target of lr"),
    ("shared target, both active", STUDY + OPT + LR + '[space.lr_sgd]\ntype = "float"\nlow = 1e-2\nhigh = 1e-1\n'
     'target = "lr"\nwhen = { optimizer = ["sgd"] }\n', "space.lr_sgd.target", "overlaps the target of lr"),
    ("conditions that exclude each other", STUDY + OPT +
     '[space.a]\ntype = "categorical"\nchoices = [1, 2]\nwhen = { optimizer = ["sgd"] }\n'
     '[space.b]\ntype = "categorical"\nchoices = [1, 2]\nwhen = { optimizer = ["adam"], a = [1] }\n',
     "space.b.when", "can never hold together"),
    ("list and its entry", STUDY + POOLS + '[space.pool]\ntype = "categorical"\nchoices = ["max", "avg"]\n'
     '[space.pool_1]\ntype = "categorical"\nchoices = ["max", "avg"]\ntarget = "model_params.pool[0]"\n',
     "space.pool_1.target", "overlaps"),
    ("unknown sampler", STUDY + LR + '[sampler]\nname = "HyperoptSampler"\n', "sampler.name", "TPESampler"),
    ("sampler not a class", STUDY + LR + '[sampler]\nname = "BaseSampler"\n', "sampler.name", "valid:"),
    ("unknown sampler key", STUDY + LR + '[sampler]\nname = "TPESampler"\nseed = 1\n', "sampler.seed", "kwargs"),
    ("unknown sampler kwarg", STUDY + LR + '[sampler]\nname = "TPESampler"\nkwargs = { n_startup = 3 }\n',
     "sampler.kwargs.n_startup", "n_startup_trials"),
    ("missing sampler kwarg", STUDY + LR + '[sampler]\nname = "GridSampler"\n', "sampler.kwargs", "search_space"),
    ("bad seed", STUDY + LR + '[sampler]\nname = "RandomSampler"\nkwargs = { seed = "x" }\n', "sampler.kwargs.seed",
     "integer"),
    ("unknown pruner", STUDY + LR + '[pruner]\nname = "MeanPruner"\n', "pruner.name", "MedianPruner"),
    ("bad pruner value", STUDY + LR + '[pruner]\nname = "MedianPruner"\nkwargs = { n_warmup_steps = -1 }\n',
     "pruner.kwargs", "MedianPruner rejects"),
    ("enqueue not tables", "enqueue = [1]\n" + STUDY + LR, "enqueue", "[[enqueue]]"),
    ("enqueue unknown param", STUDY + LR + "[[enqueue]]\nlearning_rate = 0.01\n", "enqueue[0].learning_rate",
     "no such parameter"),
    ("enqueue outside range", STUDY + LR + "[[enqueue]]\nlr = 0.5\n", "enqueue[0].lr", "outside the space"),
    ("enqueue unknown choice", STUDY + OPT + '[[enqueue]]\noptimizer = "rmsprop"\n', "enqueue[0].optimizer",
     "outside the space"),
    ("enqueue child without parent", STUDY + OPT + MOMENTUM + "[[enqueue]]\nmomentum = 0.8\n", "enqueue[0].momentum",
     "give optimizer too"),
    ("enqueue inactive child", STUDY + OPT + MOMENTUM + '[[enqueue]]\noptimizer = "adam"\nmomentum = 0.8\n',
     "enqueue[0].momentum", "applies only when"),
    ("second enqueue bad", STUDY + LR + "[[enqueue]]\nlr = 0.01\n[[enqueue]]\nlr = 0\n", "enqueue[1].lr",
     "outside the space"),
]


@pytest.mark.parametrize("text,key,expected", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_study_is_one_line_naming_file_and_key(tmp_path, text, key, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ") or message == f"{path}: {key}", message
    assert expected in message, message
    assert "\n" not in message


def test_make_sampler_offsets_the_seed_per_worker(tmp_path):
    spec = load_spec(write(tmp_path, STUDY + LR + '[sampler]\nname = "RandomSampler"\nkwargs = { seed = 7 }\n'))

    def first_lr(offset: int) -> float:
        study = optuna.create_study(sampler=make_sampler(spec, seed_offset=offset))
        return study.ask().suggest_float("lr", 1e-4, 1e-1, log=True)

    assert isinstance(make_sampler(spec), optuna.samplers.RandomSampler)
    assert first_lr(0) == first_lr(0)
    assert first_lr(0) != first_lr(1) != first_lr(2)
    assert spec.sampler.kwargs == {"seed": 7}  # the spec keeps the base seed


def test_make_sampler_without_seed_ignores_the_offset(tmp_path):
    spec = load_spec(write(tmp_path, STUDY + LR + '[sampler]\nname = "TPESampler"\nkwargs = { n_startup_trials = 3 }\n'))
    assert isinstance(make_sampler(spec, seed_offset=5), optuna.samplers.TPESampler)


def test_make_pruner_passes_the_kwargs(tmp_path):
    spec = load_spec(write(tmp_path, STUDY + LR + '[pruner]\nname = "NopPruner"\n'))
    assert isinstance(make_pruner(spec), optuna.pruners.NopPruner)
    spec = load_spec(write(tmp_path, STUDY + LR + '[pruner]\nname = "MedianPruner"\n'
                                                   'kwargs = { n_startup_trials = 2, n_warmup_steps = 4 }\n'))
    pruner = make_pruner(spec)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (2, 4)


def test_enqueued_values_are_kept_and_floats_normalised(tmp_path):
    spec = load_spec(write(tmp_path, STUDY + OPT + MOMENTUM + LR.replace("1e-1", "1") +
                           '[[enqueue]]\noptimizer = "sgd"\nmomentum = 0.9\nlr = 1\n[[enqueue]]\noptimizer = "adam"\n'))
    assert spec.enqueue == ({"optimizer": "sgd", "momentum": 0.9, "lr": 1.0}, {"optimizer": "adam"})
    assert isinstance(spec.enqueue[0]["lr"], float)


# Property tests: any generated valid space round-trips; any junk is a SpecError, never a crash.

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(lambda n: n not in config.FIELDS)
SCALARS = st.one_of(st.text(max_size=4), st.integers(-5, 5), st.booleans(),
                    st.floats(-10, 10, allow_nan=False, allow_infinity=False))


@st.composite
def param_tables(draw, parents: dict) -> dict:
    kind = draw(st.sampled_from(["float", "int", "categorical"]))
    if kind == "categorical":
        table = {"type": kind, "choices": draw(st.lists(SCALARS, min_size=1, max_size=4, unique=True))}
    elif kind == "int":
        low = draw(st.integers(-50, 50))
        step = draw(st.integers(1, 5))
        table = {"type": kind, "low": low, "high": low + step * draw(st.integers(0, 5))}
        if low >= 1 and draw(st.booleans()):
            table["log"] = True
        elif step > 1:
            table["step"] = step
    else:
        low = draw(st.floats(-100, 100, allow_nan=False))
        table = {"type": kind, "low": low, "high": low + draw(st.floats(0, 100, allow_nan=False))}
        if low > 0 and draw(st.booleans()):
            table["log"] = True
    categorical = {n: t for n, t in parents.items() if t["type"] == "categorical"}
    if categorical and draw(st.booleans()):
        parent = draw(st.sampled_from(sorted(categorical)))
        choices = categorical[parent]["choices"]
        table["when"] = {parent: draw(st.lists(st.sampled_from(choices), min_size=1, unique=True))}
    return table


@st.composite
def study_docs(draw) -> dict:
    space: dict = {}
    for name in draw(st.lists(NAMES, min_size=1, max_size=5, unique=True)):
        space[name] = draw(param_tables(space))
    return {"study": {"name": "h", "n_trials": draw(st.integers(1, 100))}, "space": space,
            "sampler": {"name": "RandomSampler", "kwargs": {"seed": draw(st.integers(0, 1000))}}}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(study_docs())
def test_generated_spaces_round_trip_and_suggest_inside_the_space(doc):
    spec = spec_from_dict(doc)
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec
    by_name = {p.name: p for p in spec.space}
    study = optuna.create_study(sampler=make_sampler(spec))
    for _ in range(3):
        params = suggest_params(study.ask(), spec)
        assert all(contains(by_name[n], v) for n, v in params.items())
        assert all(is_active(by_name[n], params) for n in params)


JUNK = st.recursive(
    st.one_of(st.none(), SCALARS, st.floats(), st.sampled_from(["sgd", "mnist", "convnet", "lr", "x", "TPESampler"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["x", "lr", "seed", "n_startup_trials"]), inner, max_size=3)),
    max_leaves=6)
# Where junk goes: each section of a valid study, and the keys each one reads.
AREAS = {
    ("study",): ["name", "n_trials", "metric", "direction", "timeout", "description"],
    ("data",): ["dataset", "subset", "val_fraction", "data_options", "extra"],
    ("fixed",): ["model", "epochs", "model_params", "optimizer", "nesterov", "extra"],
    ("space", "x"): ["type", "low", "high", "log", "step", "choices", "when", "target", "extra"],
    ("space", "momentum"): ["type", "low", "high", "when", "target"],
    ("sampler",): ["name", "kwargs", "extra"],
    ("pruner",): ["name", "kwargs"],
}


def valid_doc() -> dict:
    return {"study": {"name": "j", "n_trials": 1}, "data": {}, "fixed": {},
            "space": {"x": {"type": "categorical", "choices": ["sgd", "adam"], "target": "optimizer"},
                      "momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"x": ["sgd"]}}},
            "sampler": {"name": "RandomSampler"}, "pruner": {"name": "MedianPruner"}, "enqueue": [{"x": "sgd"}]}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(AREAS)).flatmap(lambda area: st.tuples(
    st.just(area), st.dictionaries(st.sampled_from(AREAS[area]), JUNK, min_size=1, max_size=3))),
    st.one_of(st.none(), st.lists(st.dictionaries(st.sampled_from(["x", "momentum", "lr"]), JUNK), max_size=2)))
def test_junk_is_a_one_line_spec_error_never_a_crash(where, enqueue):
    (area, junk), doc = where, valid_doc()
    table = doc
    for part in area:
        table = table[part]
    table.update(junk)
    if enqueue is not None:
        doc["enqueue"] = enqueue
    try:
        spec_from_dict(doc)
    except SpecError as err:
        assert str(err).startswith("stored spec: ") and "\n" not in str(err)


def test_overrides_shrink_a_shipped_study_and_are_validated():
    from search.spec import SpecError, load_spec

    spec = load_spec("studies/mnist_pooling.toml",
                     ["study.n_trials=5", "study.name=mnist_pooling_cpu", "data.subset=1000", "fixed.epochs=2"])
    assert (spec.n_trials, spec.name, spec.data["subset"], spec.fixed["epochs"]) == (5, "mnist_pooling_cpu", 1000, 2)
    with pytest.raises(SpecError, match="mnist_pooling.toml: .*n_trials"):
        load_spec("studies/mnist_pooling.toml", ["study.n_trials=0"])


def test_a_start_is_set_key_by_key_and_checked_like_the_file():
    """`--set enqueue[0].step_size=4`: the three-conv start's StepLR step (20 of 40 epochs) cut
    with the trials to 8 epochs; null leaves a key to the sampler; a start that is not there, or
    a value outside the space, is one line."""
    from search.spec import SpecError, load_spec

    cut = ["fixed.epochs=8", "pruner.kwargs.max_resource=8", "space.step_size.low=1", "space.step_size.high=6",
           "space.step_size.step=1"]
    spec = load_spec("studies/cifar10_threeconv.toml", [*cut, "enqueue[0].step_size=4", "enqueue[1].width=null"])
    assert spec.enqueue[0]["step_size"] == 4 and spec.enqueue[0]["lr"] == 1e-3 and "width" not in spec.enqueue[1]
    assert load_spec("studies/cifar10_threeconv.toml").enqueue[0]["step_size"] == 20  # the file is untouched
    for bad, fragment in ((["enqueue[2].lr=1e-3"], "--set 'enqueue[2].lr=1e-3': the study has 2 [[enqueue]] entries"),
                          ([*cut], "enqueue[0].step_size: 20 is outside the space (int in [1, 6])"),
                          (["enqueue[0].lr=5"], "enqueue[0].lr: 5 is outside the space"),
                          (["enqueue[0].nope=1"], "enqueue[0].nope: no such parameter")):
        with pytest.raises(SpecError) as info:
            load_spec("studies/cifar10_threeconv.toml", bad)
        assert fragment in str(info.value) and "\n" not in str(info.value), info.value


# Samplers and pruners checked by use (issue 14, class 2): one trial is drawn on a throwaway
# in-memory study at create, so a sampler that cannot sample the space is one line there, not a
# crash (or a spin) in every worker.

GRID = '[sampler]\nname = "GridSampler"\nkwargs = {{ search_space = {{ {grid} }} }}\n'


@pytest.mark.parametrize("grid,missing", [
    ("lr = [1e-3]", "optimizer"),
    ('lr = [1e-3], optimizer = ["sgd", "adam"]', "momentum"),  # conditional: active only for sgd
], ids=["top-level", "conditional"])
def test_a_sampler_that_cannot_sample_the_space_is_one_line_at_create(tmp_path, grid, missing):
    path = write(tmp_path, STUDY + LR + OPT + MOMENTUM + GRID.format(grid=grid))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    expected = f"{path}: sampler.kwargs.search_space: GridSampler cannot sample space.{missing} ("
    assert message.startswith(expected) and "is not found in the given grid" in message, message
    assert "\n" not in message


def test_a_grid_that_covers_the_space_passes_and_samples_it(tmp_path):
    grid = 'lr = [1e-3, 1e-2], optimizer = ["sgd", "adam"], momentum = [0.5, 0.9]'
    spec = load_spec(write(tmp_path, STUDY + LR + OPT + MOMENTUM + GRID.format(grid=grid)))
    params = suggest_params(optuna.create_study(sampler=make_sampler(spec)).ask(), spec)
    assert params["lr"] in (1e-3, 1e-2) and params["optimizer"] in ("sgd", "adam")


@pytest.mark.parametrize("seed", [2**32, -1, 2**40])
def test_sampler_seed_out_of_range_is_one_line(tmp_path, seed):
    path = write(tmp_path, STUDY + LR + f'[sampler]\nname = "RandomSampler"\nkwargs = {{ seed = {seed} }}\n')
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: sampler.kwargs.seed: expected an integer in [0, 2**32), got {seed}"


@pytest.mark.parametrize("name", ["RandomSampler", "TPESampler"])
def test_the_worker_offset_never_pushes_a_seed_out_of_range(tmp_path, name):
    top = 2**32 - 1
    spec = load_spec(write(tmp_path, STUDY + LR + f'[sampler]\nname = "{name}"\nkwargs = {{ seed = {top} }}\n'))
    pid_like = 4_194_304  # pid_max on Linux

    def first_lr(sampler) -> float:
        return optuna.create_study(sampler=sampler).ask().suggest_float("lr", 1e-4, 1e-1, log=True)

    wrapped = getattr(optuna.samplers, name)(seed=(top + pid_like) % 2**32)
    assert first_lr(make_sampler(spec, seed_offset=pid_like)) == first_lr(wrapped)
    assert first_lr(make_sampler(spec, seed_offset=0)) != first_lr(make_sampler(spec, seed_offset=1))
    with pytest.raises(SpecError, match="expected key=value"):
        load_spec("studies/mnist_pooling.toml", ["study.n_trials"])
