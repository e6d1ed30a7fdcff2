"""Multi-objective studies: objectives and limits in the study file, MACs, a study run by the real
worker with trials over a per-trial limit, the Pareto front in status, export --pick."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from typer.testing import CliRunner

from search import check, costs, objectives
from search.config import RunConfig
from search.cli import app
from search.spec import SpecError, load_spec, spec_from_dict, spec_to_dict

from studykit import assert_one_line_error

runner = CliRunner()
SHIPPED = Path(__file__).parent.parent / "studies"

STUDY = '[study]\nname = "t"\nn_trials = 3\n'
LR = '[space.lr]\ntype = "float"\nlow = 1e-4\nhigh = 1e-1\nlog = true\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_objectives_list_parses_round_trips_and_fixes_each_direction(tmp_path):
    spec = load_spec(write(tmp_path, STUDY + 'objectives = ["n_params", "val_loss", "macs"]\n'
                                            "max_macs = 3e6\nmax_latency_ms = 0.5\nlatency_batch = 16\n" + LR))
    assert [(o.name, o.direction) for o in spec.objectives] == [
        ("n_params", "minimize"), ("val_loss", "minimize"), ("macs", "minimize")]
    assert spec.multi and spec.metric == "val_loss" and spec.limits == (("macs", 3_000_000), ("latency_ms", 0.5))
    stored = json.loads(json.dumps(spec_to_dict(spec)))
    assert stored["study"]["objectives"] == ["n_params", "val_loss", "macs"] and "metric" not in stored["study"]
    assert spec_from_dict(stored) == spec and spec_from_dict(stored, validate=False) == spec
    agreeing = load_spec(write(tmp_path, STUDY + 'objectives = ["val_acc", "n_params"]\n'
                                             'directions = ["maximize", "minimize"]\n' + LR))
    assert [o.direction for o in agreeing.objectives] == ["maximize", "minimize"]


def test_a_single_objective_specs_dict_is_as_before(tmp_path):
    spec = load_spec(write(tmp_path, STUDY + LR))
    assert not spec.multi and spec.limits == ()
    assert spec_to_dict(spec)["study"] == {"name": "t", "direction": "maximize", "metric": "val_acc",
                                           "n_trials": 3, "description": ""}


@pytest.mark.parametrize("text, key, words", [
    ('objectives = ["val_acc", "flops"]\n', "study.objectives[1]", "unknown metric 'flops'"),
    ('objectives = ["val_acc", "val_loss"]\n', "study.objectives", "only one learned objective"),
    ('objectives = ["n_params", "macs"]\n', "study.objectives", "needs one learned objective"),
    ('objectives = ["val_acc", "val_acc"]\n', "study.objectives[1]", "already an objective"),
    ('objectives = "val_acc"\n', "study.objectives", "a list of metric names"),
    ('objectives = ["val_acc", "n_params"]\ndirections = ["maximize", "maximize"]\n', "study.directions[1]",
     "n_params is optimised with 'minimize'"),
    ('objectives = ["val_acc", "n_params"]\ndirections = ["maximize"]\n', "study.directions", "list of 2"),
    ('objectives = ["val_acc", "n_params"]\nmetric = "val_acc"\n', "study.metric", "not both"),
    ('directions = ["maximize"]\n', "study.directions", "goes with study.objectives"),
    ('objectives = ["val_acc", "n_params"]\nmax_val_loss = 0.3\n', "study.max_val_loss", "static metrics only"),
    ("max_val_acc = 0.9\n", "study.max_val_acc", "val_acc is learned"),
    ("max_macs = -1\n", "study.max_macs", "a number > 0"),
    ('max_latency_ms = "fast"\n', "study.max_latency_ms", "a number > 0"),
    ("latency_batch = 0\n", "study.latency_batch", ">= 1"),
    (LR + '[final]\npick = "knee"\n', "final.pick", "picks from a Pareto front; this study has one objective"),
    ('objectives = ["val_acc", "n_params"]\n' + LR + '[final]\npick = "max_flops=3"\n', "final.pick",
     "expected knee or LIMIT=NUMBER"),
    ('objectives = ["val_acc", "n_params"]\n' + LR + '[final]\npick = "max_params=lots"\n', "final.pick",
     "expected knee or LIMIT=NUMBER"),
    ('objectives = ["val_acc", "n_params"]\n' + LR + "[final]\npick = 300000\n", "final.pick",
     "expected a string"),
    ('objectives = ["val_acc", "n_params"]\n' + LR + '[final]\npick = "max_macs=1e6"\n', "final.pick",
     "limits macs, which is not one of the study's objectives"),
], ids=["unknown name", "two learned", "no learned", "twice", "not a list", "contradicting direction",
        "directions length", "metric too", "directions alone", "limit on learned (multi)", "limit on learned",
        "negative limit", "string limit", "latency batch", "pick, one objective", "pick, unknown limit",
        "pick, not a number", "pick, not a string", "pick, not an objective"])
def test_bad_objectives_and_limits_are_one_line_naming_file_and_key(tmp_path, text, key, words):
    path = write(tmp_path, STUDY + text + ("" if LR in text else LR))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ") and words in message and "\n" not in message


def test_macs_of_a_small_network_are_the_hand_count():
    cfg = SimpleNamespace(model="convnet", model_params={"channels": [4], "padding": 1, "pool": ["max"], "fc": [10]},
                          batch_size=5, crop_padding=0)
    # conv 3x3, 1 -> 4 channels on 8x8 (padding 1): 8*8*4 outputs x 1*3*3; max pool -> 4*4*4 = 64 features;
    # linear 64 -> 10; linear 10 -> 3 classes. Per image, whatever the batch.
    assert check.footprint(cfg, (1, 8, 8), 3).macs == 8 * 8 * 4 * 9 + 64 * 10 + 10 * 3


def test_latency_is_milliseconds_per_image_and_limits_are_optunas_constraints():
    cfg = RunConfig(model="convnet", model_params={"channels": [4], "padding": 1, "fc": [8]})
    ms = costs.measure_latency_ms(cfg, (1, 8, 8), 3, "cpu", batch=8)
    assert 0 < ms < 100
    spec = SimpleNamespace(objectives=[], max_latency_ms=None)
    plain = costs.static_values(spec, cfg, (1, 8, 8), 3, "cpu")
    flipped = costs.static_values(spec, cfg.replace(tta_flip=True), (1, 8, 8), 3, "cpu")
    assert flipped == {**plain, "macs": 2 * plain["macs"]}  # a test-time flip is two passes an image
    spec = SimpleNamespace(limits=(("macs", 1000), ("latency_ms", 0.5)))
    assert costs.violations(spec, {"macs": 900, "latency_ms": 0.1}) == ([-100.0, -0.4], None)
    amounts, why = costs.violations(spec, {"macs": 1500, "latency_ms": 0.1})
    assert amounts[0] == 500.0 and why == "macs 1,500 > study.max_macs = 1,000"


def _trial(number, values, **attrs):
    return optuna.trial.FrozenTrial(
        number=number, state=optuna.trial.TrialState.COMPLETE, value=None, values=values, datetime_start=None,
        datetime_complete=None, params={}, distributions={}, user_attrs=attrs, system_attrs={},
        intermediate_values={}, trial_id=number)


def test_pareto_front_leaves_out_dominated_and_infeasible_trials_best_learned_first():
    goals = objectives.parse_objectives(["val_acc", "n_params"])
    trials = [_trial(0, [0.9, 5000]), _trial(1, [0.8, 6000]), _trial(2, [0.95, 9000]), _trial(3, [0.7, 100]),
              _trial(4, [0.99, 50], infeasible="macs over", constraints=[3.0]), _trial(5, [0.9, 5000])]
    assert [t.number for t in objectives.pareto_front(trials, goals)] == [2, 0, 5, 3]
    assert objectives.best(trials, goals).number == 2
    assert objectives.pick(trials, goals, "max_params=5000").number == 0
    assert objectives.pick(trials, goals, "knee").number == 0
    with pytest.raises(objectives.ExportError, match="no Pareto trial has n_params <= 10; the smallest is trial 3 "
                                                     "with 100$"):
        objectives.pick(trials, goals, "max_params=10")


STUDY_TEXT = """
[study]
name = "mo"
objectives = ["val_acc", "n_params", "macs"]
n_trials = 4
max_macs = 5000                   # channels 16: about 11,000 MACs an image, over; 2 and 4 are under

[data]
dataset = "synthetic"
data_options = { n = 300, classes = 3, size = 8, channels = 1 }

[fixed]
model = "convnet"
epochs = 2
batch_size = 32
device = "cpu"
warmup_epochs = 5
model_params = { channels = [4], padding = 1, pool = ["max"], fc = [8] }

[space.width]
type = "categorical"
choices = [2, 4, 16]
target = "model_params.channels[0]"

[space.lr]
type = "float"
low = 3e-3
high = 3e-2
log = true

[sampler]
name = "TPESampler"
kwargs = { seed = 0, n_startup_trials = 2 }

[[enqueue]]
width = 16
lr = 1e-2

[[enqueue]]
width = 2
lr = 1e-2
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    from search import study as study_mod
    from search.worker import run_worker

    folder = tmp_path_factory.mktemp("multi")
    path = folder / "mo.toml"
    path.write_text(STUDY_TEXT)
    url = f"sqlite:///{folder / 'mo.db'}"
    study_mod.create(load_spec(path), url)
    run_worker("mo", url, device="cpu", worker_index=0, artifacts="none")
    return folder, url, optuna.load_study(study_name="mo", storage=url)


def test_a_trial_over_a_limit_completes_untrained_and_informs_the_sampler(ran):
    _, _, study = ran
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    over = trials[0]  # the enqueued width 16
    assert over.params["width"] == 16 and over.user_attrs["infeasible"].startswith("macs ")
    assert over.values[0] == 0.0 and over.values[2] > 5000 and over.user_attrs["constraints"][0] > 0
    assert "curve" not in over.user_attrs and "epoch_seconds" not in over.user_attrs  # not trained
    trained = [t for t in trials if "infeasible" not in t.user_attrs]
    assert trained and all(len(t.user_attrs["curve"]) == 2 and t.user_attrs["constraints"][0] <= 0 for t in trained)
    for t in trained:  # values in the spec's order: the best epoch's val_acc, then the static costs
        assert t.values == [max(t.user_attrs["curve"]), t.user_attrs["n_params"], t.user_attrs["macs"]]
        assert t.intermediate_values == {}  # Optuna forbids report in multi-objective studies
    if hasattr(over, "constraints"):  # Optuna >= 5: the sampler reads set_constraint's values
        assert over.constraints["max_macs"] > 0 and all(t.constraints["max_macs"] <= 0 for t in trained)


def test_front_is_non_dominated_and_status_prints_it(ran):
    _, url, study = ran
    goals = objectives.parse_objectives(["val_acc", "n_params", "macs"])
    front = objectives.pareto_front(study.get_trials(), goals)
    assert front and all("infeasible" not in t.user_attrs for t in front)
    for a in front:
        assert not any(objectives._dominates(b.values, a.values, goals) for b in study.get_trials()
                       if objectives.feasible(b))
    result = runner.invoke(app, ["status", "mo", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "Pareto front:" in result.output and "1 infeasible trial " in result.output
    header = next(line for line in result.output.splitlines() if line.strip().startswith("trial"))
    assert header.split() == ["trial", "val_acc", "n_params", "macs"]
    assert f"  {front[0].number}  " in result.output
    best = runner.invoke(app, ["best", "mo", "--storage", url])
    assert best.exit_code == 0 and f"best trial {front[0].number} (on the Pareto front" in best.output


def test_export_pick_and_the_line_when_no_trial_meets_it(ran):
    folder, url, study = ran
    goals = objectives.parse_objectives(["val_acc", "n_params", "macs"])
    front = objectives.pareto_front(study.get_trials(), goals)
    smallest = min(front, key=lambda t: (t.values[1], t.number))
    out = folder / "pick.json"
    result = runner.invoke(app, ["export", "mo", "--storage", url, "-o", str(out),
                                 "--pick", f"max_params={smallest.values[1]}"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    within = [t for t in front if t.values[1] <= smallest.values[1]]
    assert doc["provenance"]["trial"] == within[0].number and doc["provenance"]["values"]["n_params"] <= smallest.values[1]
    assert runner.invoke(app, ["export", "mo", "--storage", url, "-o", str(out), "--pick", "knee"]).exit_code == 0
    none = runner.invoke(app, ["export", "mo", "--storage", url, "-o", str(out), "--pick", "max_params=10"])
    assert_one_line_error(none, f"--pick max_params=10: no Pareto trial has n_params <= 10; the smallest is trial "
                                f"{smallest.number} with {smallest.values[1]:,.0f}")
    assert_one_line_error(runner.invoke(app, ["export", "mo", "--storage", url, "--pick", "knee", "--rank", "2"]),
                          "give --trial or --rank or --pick, not two")


def test_report_of_a_multi_objective_study_has_the_front(ran):
    folder, url, _ = ran
    result = runner.invoke(app, ["report", "mo", "--storage", url, "-o", str(folder / "r.html")])
    assert result.exit_code == 0, result.output
    page = (folder / "r.html").read_text()
    assert 'id="pareto"' in page and "pareto-trials" in page


def test_a_single_objective_study_prunes_a_trial_over_a_limit_untrained(tmp_path):
    from search import study as study_mod
    from search.worker import run_worker

    path = tmp_path / "so.toml"
    path.write_text(STUDY_TEXT.replace('name = "mo"', 'name = "so"').replace(
        'objectives = ["val_acc", "n_params", "macs"]', 'metric = "val_acc"').replace("n_trials = 4", "n_trials = 2"))
    url = f"sqlite:///{tmp_path / 'so.db'}"
    study_mod.create(load_spec(path), url)
    run_worker("so", url, device="cpu", worker_index=0, artifacts="none")
    over, kept = optuna.load_study(study_name="so", storage=url).get_trials()
    assert over.state == optuna.trial.TrialState.PRUNED and over.user_attrs["stop_reason"].startswith("infeasible: macs")
    assert over.intermediate_values == {} and kept.state == optuna.trial.TrialState.COMPLETE
    assert len(kept.intermediate_values) == 2 and kept.user_attrs["constraints"][0] <= 0


def test_poor_for_its_size_is_a_median_rule_among_completed_trials_of_similar_size():
    goal = objectives.Objective("val_acc", "maximize")

    def done(number, n_params, curve, **attrs):
        return _trial(number, [max(curve), n_params], n_params=n_params, curve=curve, **attrs)

    trials = [done(0, 1000, [0.5, 0.8]), done(1, 1500, [0.6, 0.9]), done(2, 600, [0.4, 0.7]),
              done(3, 100_000, [0.99, 0.99]),  # ten times the size: not a peer
              done(4, 1000, [0.99, 0.99], infeasible="macs over")]  # infeasible: not a peer
    assert objectives.poor_for_its_size(0.45, 0, 1000, trials, goal, min_peers=3) == (0.5, 3)
    assert objectives.poor_for_its_size(0.5, 0, 1000, trials, goal, min_peers=3) is None  # the median itself
    assert objectives.poor_for_its_size(0.45, 0, 1000, trials, goal, min_peers=4) is None  # too few peers
    assert objectives.poor_for_its_size(0.85, 1, 1000, trials, goal, min_peers=1) is None
    assert objectives.poor_for_its_size(0.9, 0, 90_000, trials, goal, min_peers=1) == (0.99, 1)
    loss = objectives.Objective("val_loss", "minimize")
    assert objectives.poor_for_its_size(0.9, 1, 1000, trials, loss, min_peers=1) == (0.8, 3)


def test_a_multi_objective_study_prunes_a_trial_poor_for_its_size(tmp_path):
    from search import study as study_mod
    from search.worker import run_worker

    path = tmp_path / "mp.toml"
    path.write_text(STUDY_TEXT.replace('name = "mo"', 'name = "mp"').replace("n_trials = 4", "n_trials = 2")
                    .replace("low = 3e-3", "low = 1e-7").replace("width = 16\nlr = 1e-2", "width = 4\nlr = 1e-2")
                    .replace("width = 2\nlr = 1e-2", "width = 4\nlr = 1e-7")
                    .replace("epochs = 2", "epochs = 3")  # pruned after epoch 2, never after the last one
                    + '[pruner]\nname = "MedianPruner"\nkwargs = { n_startup_trials = 1, n_warmup_steps = 1 }\n')
    url = f"sqlite:///{tmp_path / 'mp.db'}"
    study_mod.create(load_spec(path), url)
    run_worker("mp", url, device="cpu", worker_index=0, artifacts="none")
    good, poor = optuna.load_study(study_name="mp", storage=url).get_trials()
    assert good.state == optuna.trial.TrialState.COMPLETE and poor.params["lr"] == 1e-7
    assert poor.state == optuna.trial.TrialState.PRUNED, poor.user_attrs
    assert poor.user_attrs["stop_reason"].startswith("pruned after epoch 2: val_acc ")
    assert "worse than the median" in poor.user_attrs["stop_reason"] and len(poor.user_attrs["curve"]) == 2


def test_shipped_pareto_studies_load():
    for name in ("digits_pareto", "mnist_pareto"):
        spec = load_spec(SHIPPED / f"{name}.toml")
        assert [o.name for o in spec.objectives] == ["val_acc", "n_params"] and spec.final.pick is not None
