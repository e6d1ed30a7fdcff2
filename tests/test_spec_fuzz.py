"""Property-based tests of the study-file loader: random and mutated study files either load or
fail with one SpecError line naming the file, never another exception, and never touch storage.

The mutations start from the shipped studies/*.toml: delete keys, change types, swap values, add
unknown keys, put low above high, write random strings or Python-looking code. Files are written
with the small TOML writer below (inline tables only, which TOML allows at any depth).

And end to end: a generated study is either refused by `create` with one line, or trains its
first trial (complete, or pruned; "rejected" only for an architecture that cannot fit the
input); never a third outcome, such as a crash in the trial or every trial rejected for a typo.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from search.cli import app
from search.spec import SpecError, StudySpec, load_spec

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.toml"))
BASES = [tomllib.loads(p.read_text()) for p in STUDIES]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
runner = CliRunner()


def toml_value(value) -> str:
    """dict/list/str/int/float/bool as a TOML inline value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def toml_string(text: str) -> str:
    escaped = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else
                      {"\\": "\\\\", '"': '\\"'}.get(c, c) for c in text)
    return f'"{escaped}"'


def to_toml(doc: dict) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


def test_the_writer_round_trips_the_shipped_studies():
    for base in BASES:
        assert tomllib.loads(to_toml(base)) == base


# --- mutations -----------------------------------------------------------------------------------

scalars = st.one_of(
    st.integers(-10**6, 10**6), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["__import__('os').system('touch pwned')", "eval('1e-3')", "lambda: 0", "None", "1e-3",
                     "TPESampler", "max", "sgd", "cifar10", "convnet", "model_params.pool[7]", "", " "]))
keys = st.text(min_size=1, max_size=12)  # line breaks included: messages must stay one line
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(keys, inner, max_size=4)),
                      max_leaves=8)


def paths(node, prefix=()):
    """Every (path, value) below `node`, tables and lists included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,), child
        yield from paths(child, prefix + (key,))


def parent(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc


def mutate(doc: dict, draw) -> dict:
    doc = json.loads(json.dumps(doc))  # a deep copy (the studies hold only JSON-like values)
    all_paths = [p for p, _ in paths(doc)]
    if not all_paths:
        return doc
    kind = draw(st.sampled_from(["delete", "replace", "add", "swap", "low_high", "retype"]))
    path = draw(st.sampled_from(all_paths))
    holder, key = parent(doc, path), path[-1]
    if kind == "delete":
        del holder[key]
    elif kind == "replace":
        holder[key] = draw(values)
    elif kind == "add":
        target = holder[key] if isinstance(holder[key], dict) else holder if isinstance(holder, dict) else doc
        target[draw(keys)] = draw(values)
    elif kind == "swap":
        other = draw(st.sampled_from(all_paths))
        if other[:len(path)] != path and path[:len(other)] != other:  # neither inside the other
            other_holder = parent(doc, other)
            holder[key], other_holder[other[-1]] = other_holder[other[-1]], holder[key]
    elif kind == "low_high":
        space = doc.get("space")
        ranges = [p for p in space.values() if isinstance(p, dict) and {"low", "high"} <= set(p)] \
            if isinstance(space, dict) else []
        if ranges:
            p = draw(st.sampled_from(ranges))
            numbers = all(isinstance(p[k], (int, float)) and not isinstance(p[k], bool) for k in ("low", "high"))
            p["low"], p["high"] = (p["high"] + abs(p["high"]) + 1, p["high"]) if numbers else (p["high"], p["low"])
    else:  # the same value as another type: 3 -> "3", [1] -> 1, "x" -> ["x"], {...} -> [...]
        old = holder[key]
        holder[key] = (str(old) if isinstance(old, (int, float)) else old[0] if isinstance(old, list) and old
                       else list(old.values()) if isinstance(old, dict) else [old])
    return doc


@st.composite
def mutated_studies(draw) -> dict:
    doc = draw(st.sampled_from(BASES))
    for _ in range(draw(st.integers(1, 3))):
        doc = mutate(doc, draw)
    return doc


def check_loads_or_one_line(path: Path):
    """load_spec either returns a spec or raises SpecError `<file>: <key or problem>: ...`."""
    try:
        return load_spec(path)
    except SpecError as err:
        message = str(err)
        assert len(message.splitlines()) == 1, message
        assert message.startswith(f"{path}: ") and len(message) > len(f"{path}: ") + 3, message
        return err


@FUZZ
@given(doc=mutated_studies())
def test_mutated_study_files_load_or_fail_with_one_line(tmp_path, doc):
    path = tmp_path / "study.toml"
    path.write_text(to_toml(doc))
    result = check_loads_or_one_line(path)
    assert isinstance(result, (StudySpec, SpecError))


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      mutated_studies().map(to_toml).flatmap(lambda t: st.integers(0, len(t)).map(lambda n: t[:n]))))
def test_random_and_truncated_files_fail_with_one_line(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check_loads_or_one_line(path)


overrides = st.lists(st.one_of(
    st.builds("{}.{}={}".format, st.sampled_from(["study", "data", "fixed", "space", "sampler", "enqueue", "x"]),
              st.sampled_from(["n_trials", "epochs", "subset", "name", "lr", "kwargs", "model_params.fc", "0", ""]),
              values.map(json.dumps)),
    st.text(max_size=30)), min_size=1, max_size=3)


@FUZZ
@given(doc=st.sampled_from(BASES), sets=overrides)
def test_random_set_overrides_load_or_fail_with_one_line(tmp_path, doc, sets):
    path = tmp_path / "study.toml"
    path.write_text(to_toml(doc))
    try:
        load_spec(path, sets)
    except SpecError as err:
        assert len(str(err).splitlines()) == 1 and str(err).startswith(f"{path}: "), str(err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=mutated_studies())
def test_an_invalid_study_file_never_reaches_the_storage(tmp_path, doc):
    path = tmp_path / "study.toml"
    path.write_text(to_toml(doc))
    if not isinstance(check_loads_or_one_line(path), SpecError):
        return  # valid: creating it is test_study's business
    db = tmp_path / "fuzz.db"
    result = runner.invoke(app, ["create", str(path), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {path}: "), result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not db.exists()


# --- refused at create, or the first trial trains: no third outcome -------------------------------

# The shipped studies made quick to train on this CPU: synthetic images of each study's shape (a
# few dozen), one epoch, one trial. The mutations hit what a user writes about the search itself
# ([fixed], [space], [sampler], [pruner], [[enqueue]]); [study] and [data] are the harness here
# (the tests above fuzz them at load time).
SHAPES = {"digits": (1, 8), "mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32)}
SEARCH_SECTIONS = ("fixed", "space", "sampler", "pruner", "enqueue")


def trainable(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    data = doc.get("data", {})
    if data.get("dataset") == "folder":
        options = data["data_options"]
        channels, size = options.get("channels", 3), options.get("image_size", 32)
    else:
        channels, size = SHAPES[data.get("dataset", "digits")]
    doc["study"] = {"name": "fuzz", "n_trials": 1, "max_params": 12_000_000, "max_memory": "2GiB"}
    doc["data"] = {"dataset": "synthetic", "data_options": {"n": 60, "classes": 10, "channels": channels,
                                                            "size": size}}
    return doc


# Values a user could plausibly write, so that most tweaked files still parse and reach the models.
WORDS = ["none", "max", "avg", "same", "relu", "leaky_relu", "gelu", "tanh", "flatten", "adaptive_avg",
         "adaptive_max", "sgd", "adam", "adamw", "rmsprop", "step", "cosine", "onecycle", "auto", "fp32", "bf16",
         "convnet", "lenet5", "alexnet", "mnist_fc", "mnist_pool", "cifar_sixconv_bn", "cifar_threeconv",
         "RandomSampler", "TPESampler", "QMCSampler", "NopPruner", "HyperbandPruner", "PercentilePruner",
         "model_params.fc[0]", "model_params.channels[1]", "batch_size", "crop_padding", "kernal_size"]
PLAUSIBLE = {
    int: st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 9, 16, 64, 256, 1000, 4096, 60000, 2**31, -1]),
                   st.integers(0, 300)),
    float: st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.999, 1.0, 1e-9, 10.0, -0.1]), st.floats(0, 2)),
    bool: st.booleans(),
    str: st.sampled_from(WORDS),
}
MODEL_KEYS = ["channels", "convs", "kernel_size", "padding", "pool", "pool_size", "dropout", "dropout2d",
              "batchnorm", "activation", "head", "adaptive_size", "fc", "fc_dropout", "kernal_size"]
PARAMS = st.sampled_from([  # whole [space.x] tables that are valid on their own
    ("batch_size", {"type": "categorical", "choices": [1, 2, 4096]}),
    ("crop_padding", {"type": "int", "low": 0, "high": 64}),
    ("nesterov", {"type": "categorical", "choices": [False, True]}),
    ("pool", {"type": "categorical", "choices": ["max", "none"]}),
    ("kernel_size", {"type": "int", "low": 1, "high": 9}),
    ("adaptive_size", {"type": "int", "low": 1, "high": 40}),
    ("fc_width", {"type": "categorical", "choices": [8, 60000], "target": "model_params.fc[0]"}),
    ("channels_1", {"type": "int", "low": 1, "high": 512, "target": "model_params.channels[0]"}),
    ("kernal_size", {"type": "int", "low": 3, "high": 5}),
    ("model", {"type": "categorical", "choices": ["convnet", "lenet5", "alexnet", "mnist_pool"]}),
    ("scheduler", {"type": "categorical", "choices": ["onecycle", "step"]}),
    ("seed", {"type": "int", "low": 0, "high": 2**32 - 1}),
])


def tweak(doc: dict, draw) -> dict:
    """A plausible change that keeps the file's structure: a leaf value replaced by one of its own
    kind, a model param added to [fixed], or a whole parameter added to the space."""
    doc = json.loads(json.dumps(doc))
    kind = draw(st.sampled_from(["leaf", "leaf", "model_param", "param"]))
    leaves = [p for p, v in paths(doc) if not isinstance(v, (dict, list))]
    if kind == "leaf" and leaves:
        path = draw(st.sampled_from(leaves))
        holder = parent(doc, path)
        holder[path[-1]] = draw(PLAUSIBLE[type(holder[path[-1]])])
    elif kind == "model_param" and isinstance(doc.get("fixed"), dict):
        params = doc["fixed"].setdefault("model_params", {})
        if isinstance(params, dict):
            params[draw(st.sampled_from(MODEL_KEYS))] = draw(st.one_of(
                *PLAUSIBLE.values(), st.lists(PLAUSIBLE[int], min_size=1, max_size=4)))
    elif kind == "param" and isinstance(doc.get("space"), dict):
        name, table = draw(PARAMS)
        doc["space"][name] = table
    return doc


@st.composite
def mutated_search(draw) -> dict:
    doc = trainable(draw(st.sampled_from(BASES)))
    if draw(st.booleans()):
        doc.pop("enqueue", None)  # tweaks to the space often leave an enqueued value outside it
    search = {k: doc.pop(k) for k in SEARCH_SECTIONS if k in doc}
    for _ in range(draw(st.integers(0, 2))):
        search = draw(st.sampled_from([tweak, tweak, tweak, mutate]))(search, draw)
    doc.update(search)
    if isinstance(doc.get("fixed"), dict):  # whatever else changed, one epoch on the CPU
        doc["fixed"].update(epochs=1, device="cpu")
    return doc


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=mutated_search())
def test_a_study_is_refused_at_create_or_trains_its_first_trial(tmp_path_factory, doc):
    import optuna

    from search import spec as spec_mod
    from search import study as study_mod
    from search.objective import make_objective

    folder = tmp_path_factory.mktemp("fuzz")
    path, url = folder / "study.toml", f"sqlite:///{folder / 'fuzz.db'}"
    path.write_text(to_toml(doc))
    result = runner.invoke(app, ["create", str(path), "--storage", url])
    if result.exit_code != 0:  # refused: one line, exit 1, no study
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert study_mod.list_studies(url) == [] if (folder / "fuzz.db").exists() else True
        event("refused at create")
        return
    study, spec = study_mod.load("fuzz", url)
    study.sampler, study.pruner = spec_mod.make_sampler(spec), spec_mod.make_pruner(spec)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.optimize(make_objective(spec, device="cpu"), n_trials=1, catch=())  # any crash fails the test
    (trial,) = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED))
    if trial.user_attrs.get("stop_reason", "").startswith("rejected"):
        # Pruned as "rejected" before training: right only for an architecture that cannot fit the
        # input (a property of the space); bad model params are create's to refuse.
        from models import ModelShapeError, build_model
        from search.datasets import describe
        from search.space import params_to_config

        cfg = params_to_config(spec, trial.params)
        with pytest.raises(ModelShapeError):
            build_model(cfg, *describe(cfg.dataset, cfg.data_options))
    event(f"first trial {trial.state.name.lower()}")


# --- study files are data ------------------------------------------------------------------------


def test_python_looking_strings_in_a_study_file_are_just_data(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    doc = json.loads(json.dumps(BASES[STUDIES.index(next(p for p in STUDIES if p.stem == "digits_quick"))]))
    doc["study"]["description"] = code
    path = tmp_path / "study.toml"
    path.write_text(to_toml(doc))
    assert load_spec(path).description == code and not marker.exists()

    doc["study"]["n_trials"] = f"__import__('os').system('touch {marker}') or 20"
    doc["space"]["lr"]["low"] = "eval('1e-4')"
    path.write_text(to_toml(doc))
    with pytest.raises(SpecError, match=r"study\.n_trials: expected an integer"):
        load_spec(path)
    assert not marker.exists()


def test_a_key_with_a_line_break_is_escaped_in_the_message(tmp_path):
    """Found by the fuzz tests above: keys are echoed as the file spells them."""
    path = tmp_path / "study.toml"
    path.write_text(to_toml({"study": {"name": "x", "n_trials": 3, "bad\nkey": 1}}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert len(str(info.value).splitlines()) == 1, str(info.value)
