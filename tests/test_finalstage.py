"""The final stage (search/finalstage.py): a study with [final] ends with its tested final model.

Workers go on from the search to the child study `<name>.final`: finalists at the final budget
(no test read), the best on validation over seeds (the test read once per seed), results in
status, best, export and export --model; a killed finalist resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from search import finalstage, objectives
from search import spec as spec_mod
from search import study as study_mod
from search.cli import app
from search.errors import SpecError
from search.storage import open_storage
from search.worker import run_worker
from studykit import assert_one_line_error, start_worker, tiny_study

runner = CliRunner()
BASELINE = '[[enqueue]]\nlr = 3e-3\noptimizer = "adam"\n'  # the study's start
FINAL = "\n[final]\nfinalists = 2\nepochs = 4\nseeds = 2\n"


def _study(tmp_path: Path, final: str = FINAL, n_trials: int = 5, name: str = "fin", epochs: int = 3,
           extra: str = "") -> tuple[str, spec_mod.StudySpec]:
    path = tiny_study(tmp_path, name=name, n_trials=n_trials, epochs=epochs, pruner='name = "NopPruner"',
                      enqueue=BASELINE + extra + final)
    path.write_text(path.read_text().replace("low = 1e-6", "low = 3e-3"))  # lr in [3e-3, 3e-2]: trials learn
    spec = spec_mod.load_spec(path)
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec, url)
    return url, spec


def _child_trials(url: str, name: str = "fin") -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url, heartbeat_interval=None)
    return optuna.load_study(study_name=f"{name}.final", storage=storage).get_trials()


def _results(url: str, name: str = "fin") -> dict:
    study, spec = study_mod.load(name, url, validate=False)
    return finalstage.results(study, spec)


def test_a_study_with_final_ends_with_its_tested_model(tmp_path):
    url, spec = _study(tmp_path)
    result = run_worker("fin", url, device="cpu", worker_index=0)
    assert result.stopped_because == "final stage done"
    res = _results(url)
    assert res["done"]
    finalists = res["finalists"]
    study = study_mod.load("fin", url)[0]
    top2 = [t.number for t in sorted((t for t in study.get_trials() if t.state == TrialState.COMPLETE),
                                     key=lambda t: (-t.value, t.number))[:2]]
    # the 2 best trials, and the enqueued start (trial 0) when it is not one of them
    assert [f["source_trial"] for f in finalists] == top2 + ([] if 0 in top2 else [0])
    assert [f["baseline"] for f in finalists] == [n == 0 for n in top2] + ([] if 0 in top2 else [True])
    assert any("added as a finalist" in n for n in res["notes"]) == (0 not in top2)
    assert all(f["epochs"] == 4 for f in finalists)
    assert all(f["test_acc"] is None for f in finalists)  # finalists never read the test split
    best_value = max(f["value"] for f in finalists if f["state"] == "COMPLETE")
    assert res["chosen"]["value"] == best_value
    assert [s["seed"] for s in res["seeds"]] == [0, 1]
    assert all(s["test_acc"] is not None for s in res["seeds"])
    # seed 0 is the chosen finalist's own run: tested, not trained again
    assert res["seeds"][0]["reused_from"] == res["chosen"]["number"]
    assert res["seeds"][0]["value"] == res["chosen"]["value"]
    assert res["test_mean"] == pytest.approx(sum(s["test_acc"] for s in res["seeds"]) / 2)
    assert res["config"]["epochs"] == 4 and res["config"]["subset"] is None
    # the files kept: the chosen finalist's model (= seed 0's) and seed 1's; the others' removed
    kept = sorted(p.name for p in (tmp_path / "s-artifacts").iterdir())
    assert kept == sorted({s["model"] for s in res["seeds"]})
    # a second worker finds nothing left to do
    assert run_worker("fin", url, device="cpu").stopped_because == "final stage done"
    assert len(_child_trials(url)) == len(finalists) + 2


def test_status_best_export_and_predict_show_the_final_model(tmp_path):
    url, spec = _study(tmp_path)
    run_worker("fin", url, device="cpu", worker_index=0)
    res = _results(url)
    status = runner.invoke(app, ["status", "fin", "--storage", url])
    assert status.exit_code == 0, status.output
    line = f"final: test acc {res['test_mean']:.2%} ± {res['test_std']:.2%} over 2 seeds"
    assert line in status.output
    assert "artifacts: 2 files" in status.output
    best = runner.invoke(app, ["best", "fin", "--storage", url])
    assert line in best.output
    model = tmp_path / "final.pt"
    export = runner.invoke(app, ["export", "fin", "--storage", url, "-o", str(tmp_path / "f.json"),
                                 "--model", str(model)])
    assert export.exit_code == 0, export.output
    assert "the final stage's chosen config" in export.output
    predict = runner.invoke(app, ["predict", str(model), "--dataset-test"])
    assert predict.exit_code == 0, predict.output
    chosen_seed = next(s for s in res["seeds"] if s["model"] == res["model"])
    assert f"accuracy {chosen_seed['test_acc']:.2%}" in predict.output
    report = runner.invoke(app, ["report", "fin", "--storage", url, "-o", str(tmp_path / "r.html"),
                                 "--png", str(tmp_path / "png")])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "r.html").read_text()
    assert '<section id="final">' in page and line in page and "reused the chosen finalist" in page
    assert (tmp_path / "png" / "final-curves.png").stat().st_size > 10_000
    # the exported config trains the chosen config at the final budget
    import json

    doc = json.loads((tmp_path / "f.json").read_text())
    assert doc["config"]["epochs"] == 4 and doc["provenance"]["final"]["test_mean"] == res["test_mean"]


def test_export_model_before_the_final_stage_is_one_line(tmp_path):
    url, spec = _study(tmp_path)
    result = runner.invoke(app, ["export", "fin", "--storage", url, "--model", str(tmp_path / "m.pt")])
    assert_one_line_error(result, "has no final stage yet")
    assert not (tmp_path / "m.pt").exists()


def test_more_finalists_than_completed_trials_uses_what_exists(tmp_path):
    url, spec = _study(tmp_path, final="\n[final]\nfinalists = 9\nepochs = 3\nseeds = 1\nbaseline = false\n",
                       n_trials=2)
    run_worker("fin", url, device="cpu", worker_index=0)
    res = _results(url)
    done = sum(t.state == TrialState.COMPLETE for t in study_mod.load("fin", url)[0].get_trials())
    assert len(res["finalists"]) == done
    assert any(n.startswith(f"9 finalists asked for, {done} completed") for n in res["notes"])
    assert res["done"] and len(res["seeds"]) == 1


def test_baseline_2_makes_both_starts_finalists_and_true_is_one(tmp_path):
    # a second start (plain SGD here) is a finalist whatever its search rank, and judged at the final budget
    second = '[[enqueue]]\nlr = 3.1e-3\noptimizer = "sgd"\nmomentum = 0.0\n'
    url, spec = _study(tmp_path, final="\n[final]\nfinalists = 1\nepochs = 3\nseeds = 1\nbaseline = 2\n",
                       extra=second, n_trials=4)
    assert spec.final.baseline == 2
    create = runner.invoke(app, ["create", str(tmp_path / "fin.toml"), "--storage", url])
    assert create.exit_code == 0 and "1 finalist and the 2 starts" in create.output, create.output
    run_worker("fin", url, device="cpu", worker_index=0)
    res = _results(url)
    study = study_mod.load("fin", url)[0]
    best = max((t for t in study.get_trials() if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
    sources = [f["source_trial"] for f in res["finalists"]]
    assert sources == [best.number] + [n for n in (0, 1) if n != best.number]
    assert all(f["baseline"] for f in res["finalists"] if f["source_trial"] in (0, 1))
    if best.number != 1:
        assert any("([[enqueue]] 2, trial 1) added as a finalist" in n for n in res["notes"]), res["notes"]
    assert res["done"] and len(res["seeds"]) == 1
    (tmp_path / "t").mkdir()
    assert spec_mod.load_spec(tiny_study(tmp_path / "t", enqueue=BASELINE + "[final]\nbaseline = true\n")).final.baseline == 1


def test_final_config_stretches_steplr_and_uses_all_images(tmp_path):
    url, spec = _study(tmp_path, final="\n[final]\nepochs = 12\n")
    cfg = finalstage.final_config(spec, {"lr": 1e-3, "optimizer": "adam"})
    assert cfg.epochs == 12 and cfg.subset is None
    import dataclasses

    stepped = dataclasses.replace(spec, fixed={**spec.fixed, "scheduler": "step", "step_size": 2},
                                  data={**spec.data, "subset": 100})
    cfg = finalstage.final_config(stepped, {"lr": 1e-3, "optimizer": "adam"})
    assert (cfg.step_size, cfg.subset) == (8, None)  # 2 of 3 epochs -> 8 of 12
    kept = dataclasses.replace(stepped, final=dataclasses.replace(stepped.final, stretch_schedule=False,
                                                                  full_data=False))
    cfg = finalstage.final_config(kept, {"lr": 1e-3, "optimizer": "adam"})
    assert (cfg.step_size, cfg.subset) == (2, 100)


@pytest.mark.parametrize("section, fragment", [
    ("finalists = 0", "final.finalists: expected an integer >= 1, got 0"),
    ("seeds = \"3\"", "final.seeds: expected an integer >= 1, got '3'"),
    ("full_data = \"yes\"", "final.full_data: expected true or false"),
    ("top_k = 3", "final.top_k: unknown key (valid: finalists,"),
    ("epochs = 2\naverage_last = 3", "final.average_last: 3 epochs, more than the final budget of 2"),
    ("epochs = 1.5", "final.epochs: expected an integer >= 1"),
    ("baseline = 2", "final.baseline: 2 starts asked for, the study has 0 [[enqueue]] entries"),
    ("baseline = -1", "final.baseline: expected true, false or a number of [[enqueue]] entries, got -1"),
    ("baseline = \"all\"", "final.baseline: expected true, false or a number of [[enqueue]] entries, got 'all'"),
    ("baseline = 1.0", "final.baseline: expected true, false or a number"),
    ("variants = [{ nope = 1 }]", "final.variants[0].nope: no such parameter (parameters: lr, optimizer, momentum)"),
    ("variants = [{ lr = 1.0 }]", "final.variants[0].lr: 1.0 is outside the space (float in [1e-06, 0.03])"),
    ("variants = [{ lr = \"high\" }]", "final.variants[0].lr: 'high' is outside the space"),
    ("variants = [{ optimizer = \"rmsprop\" }]", "final.variants[0].optimizer: 'rmsprop' is outside the space"),
    ("variants = [{ momentum = 0.9 }]", "final.variants[0].momentum: applies only when optimizer in ['sgd']"),
    ("variants = [{ optimizer = \"adam\" }]", "final.variants[0].optimizer: momentum depends on it"),
    ("variants = [{ lr = 0.01 }, {}]", "final.variants[1]: an empty table"),
    ("variants = [{ lr = 0.01 }, { lr = 1e-2 }]", "final.variants[1]: the same as final.variants[0]"),
    ("variants = { lr = 0.01 }", "final.variants: expected a list of tables"),
    ("variants = [\"lr\"]", "final.variants: expected a list of tables"),
])
def test_a_bad_final_section_is_one_line_at_load(tmp_path, section, fragment):
    path = tiny_study(tmp_path, enqueue=f"[final]\n{section}\n")
    with pytest.raises(SpecError, match=None) as err:
        spec_mod.load_spec(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    result = runner.invoke(app, ["create", str(path), "--storage", f"sqlite:///{tmp_path}/v.db"])
    assert_one_line_error(result, fragment)  # and create stores nothing
    assert not (tmp_path / "v.db").exists() or not optuna.get_all_study_names(f"sqlite:///{tmp_path}/v.db")


def test_the_final_section_round_trips_and_specs_without_it_are_unchanged(tmp_path):
    with_final = spec_mod.load_spec(tiny_study(tmp_path, enqueue="[final]\nseeds = 5\n"))
    assert with_final.final == spec_mod.FinalSpec(seeds=5)
    doc = spec_mod.spec_to_dict(with_final)
    assert spec_mod.spec_from_dict(doc) == with_final == spec_mod.spec_from_dict(doc, validate=False)
    without = spec_mod.load_spec(tiny_study(tmp_path, name="plain"))
    assert without.final is None and "final" not in spec_mod.spec_to_dict(without)


def test_delete_and_replace_remove_the_final_stage_too(tmp_path):
    url, spec = _study(tmp_path, final="\n[final]\nfinalists = 1\nepochs = 3\nseeds = 1\n", n_trials=2)
    run_worker("fin", url, device="cpu", worker_index=0)
    storage = open_storage(url, heartbeat_interval=None)
    names = lambda: sorted(s.study_name for s in optuna.get_all_study_summaries(storage))  # noqa: E731
    assert names() == ["fin", "fin.final"]
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, name="fin", n_trials=3, enqueue=BASELINE + FINAL)),
                     url, replace=True)
    assert names() == ["fin"]
    study_mod.delete("fin", url)
    assert names() == []


def test_two_workers_split_the_final_stage_and_a_killed_finalist_resumes(tmp_path):
    """Two worker processes; one is killed with SIGKILL in the middle of a finalist's epochs. The
    other retries that finalist from its checkpoint; every job ends done exactly once."""
    url, spec = _study(tmp_path, final="\n[final]\nfinalists = 2\nepochs = 60\nseeds = 2\nbaseline = false\n",
                       n_trials=3)
    fast = ("--heartbeat", "1", "--grace", "4")
    logs = [tmp_path / f"w{k}.log" for k in range(3)]
    workers = [start_worker("fin", url, *fast, log=logs[k]) for k in range(2)]
    try:
        deadline = time.monotonic() + 240
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, logs[0].read_text() + logs[1].read_text()
            try:
                running = [t for t in _child_trials(url) if t.state == TrialState.RUNNING
                           and t.user_attrs.get("role") == "finalist" and len(t.intermediate_values) >= 3
                           and "checkpoint" in t.user_attrs]
            except KeyError:  # the child study is not there yet
                running = []
            if running:
                pid = running[0].user_attrs["pid"]
                victim = next(w for w in workers if w.pid == pid)
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        workers.append(start_worker("fin", url, *fast, log=logs[2]))
        for w in workers:
            if w is not victim:
                assert w.wait(timeout=300) == 0
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    trials = _child_trials(url)
    # each job ended once (a finalist may diverge at this lr and be pruned; that is its result)
    jobs = [t.user_attrs["job"] for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    states = [(t.number, t.state.name, t.user_attrs.get("job"), t.user_attrs.get("stop_reason")) for t in trials]
    storage = open_storage(url, heartbeat_interval=None)
    n_finalists = optuna.load_study(study_name="fin.final", storage=storage).user_attrs[finalstage.READY_ATTR]
    assert n_finalists >= 1  # 2 asked for; fewer when fewer search trials completed
    assert sorted(jobs) == [f"finalist:{k}" for k in range(n_finalists)] + ["seed:0", "seed:1"], states
    retry = next(t for t in trials if "retry_history" in t.system_attrs and t.state == TrialState.COMPLETE)
    assert retry.user_attrs["resumed_from_epoch"] >= 2
    assert len(retry.intermediate_values) == 60  # every epoch reported once, none missing
    res = _results(url)
    assert res["done"] and res["test_mean"] is not None
    assert "final stage done" in logs[2].read_text() or any("final stage done" in p.read_text() for p in logs)


def test_warm_start_enqueues_the_other_studys_best_that_fit(tmp_path):
    url, _ = _study(tmp_path, final="", n_trials=4)
    run_worker("fin", url, device="cpu", worker_index=0)
    other = study_mod.load("fin", url)[0]
    top = sorted((t for t in other.get_trials() if t.state == TrialState.COMPLETE),
                 key=lambda t: -t.value)[:2]
    path = tmp_path / "warm.toml"
    # a narrower space: lr from 1e-2 only, so lower ones do not fit and are dropped
    text = tiny_study(tmp_path, name="warm", n_trials=3).read_text().replace("low = 1e-6", "low = 1e-2")
    path.write_text(text + '\n[warm_start]\nstudy = "fin"\ntop = 2\n')
    made = study_mod.create(spec_mod.load_spec(path), url)
    waiting = [t for t in made.study.get_trials() if t.state == TrialState.WAITING]
    expected = []  # (what fits, its source), a configuration enqueued once
    for src in top:
        fits = {k: v for k, v in src.params.items() if not (k == "lr" and v < 1e-2)}
        if fits not in [e[0] for e in expected]:
            expected.append((fits, f"fin trial {src.number}"))
    assert [(t.system_attrs["fixed_params"], t.user_attrs["warm_start"]) for t in waiting] == expected
    dropped = [t for t in top if t.params["lr"] < 1e-2]
    assert len([w for w in made.warnings if "does not fit" in w]) == len(dropped)


def test_warm_start_from_a_missing_study_is_one_line_and_creates_nothing(tmp_path):
    path = tmp_path / "warm.toml"
    path.write_text(tiny_study(tmp_path, name="warm").read_text() + '\n[warm_start]\nstudy = "nope"\n')
    url = f"sqlite:///{tmp_path}/w.db"
    result = runner.invoke(app, ["create", str(path), "--storage", url])
    assert_one_line_error(result, "warm_start.study: no study named 'nope'")
    assert study_mod.list_studies(url) == []


def test_a_job_stands_for_its_best_trial_and_duplicates_are_found():
    """Retries of one dead job: the completed copy stands for the job, a later copy is a duplicate."""
    make = lambda n, state, value=None: optuna.trial.create_trial(  # noqa: E731
        state=state, value=value, user_attrs={"role": "finalist", "job": "finalist:0"})
    trials = [make(0, TrialState.FAIL), make(1, TrialState.COMPLETE, 0.9), make(2, TrialState.RUNNING)]
    for k, t in enumerate(trials):
        t.number = k
    assert finalstage._latest(trials, "finalist")["finalist:0"].number == 1
    assert finalstage.duplicate_of(trials[2], trials) == 1
    assert finalstage.duplicate_of(trials[1], trials[:2]) is None
    running = [make(0, TrialState.FAIL), make(1, TrialState.RUNNING), make(2, TrialState.RUNNING)]
    for k, t in enumerate(running):
        t.number = k
    assert finalstage.duplicate_of(running[2], running) == 1  # the earlier copy goes on
    assert finalstage.duplicate_of(running[1], running) is None


def test_a_multi_objective_final_stage_trains_the_pick_and_no_larger_front_trials(tmp_path):
    """[final] pick = "knee" in an accuracy-vs-size study: the finalists are the front's knee and
    the best front trials no larger than it (the start only if it is no larger either); the
    choice, seeds and test read are as with one objective; list, status and export show it."""
    width = '[space.width]\ntype = "categorical"\nchoices = [2, 8, 32]\ntarget = "model_params.channels[1]"\n'
    path = tiny_study(tmp_path, name="mo", n_trials=8, epochs=3, pruner='name = "NopPruner"',
                      extra_study='objectives = ["val_acc", "n_params"]',
                      enqueue=BASELINE + width + '\n[final]\npick = "knee"\nfinalists = 2\nepochs = 4\nseeds = 2\n')
    path.write_text(path.read_text().replace("low = 1e-6", "low = 3e-3"))
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(path), url)
    assert run_worker("mo", url, device="cpu", worker_index=0).stopped_because == "final stage done"
    study, spec = study_mod.load("mo", url)
    trials = study.get_trials()
    picked = objectives.pick(trials, spec.objectives, "knee")
    res = finalstage.results(study, spec)
    assert res["done"] and res["test_mean"] is not None and len(res["seeds"]) == 2
    by_number = {t.number: t for t in trials}
    sources = [f["source_trial"] for f in res["finalists"]]
    assert sources[0] == picked.number
    size = {n: by_number[n].values[1] for n in sources}
    assert all(size[n] <= picked.values[1] for n in sources), (size, picked.values)
    start = by_number[0]  # the enqueued start: a finalist exactly when it is no larger than the pick
    assert (0 in sources) == (start.values[1] <= picked.values[1]), (sources, start.values, picked.values)
    picked_size = f"{picked.values[1]:,.0f}"
    assert f"final.pick knee: trial {picked.number} (n_params {picked_size}); finalists from it" in res["notes"][0], res["notes"]
    assert all(f["test_acc"] is None for f in res["finalists"])
    listed = runner.invoke(app, ["list", "--storage", url]).stdout.splitlines()
    assert listed[0].startswith("mo ") and "Pareto front" in listed[0]
    assert listed[1].startswith("mo.final ") and listed[1].endswith("(final stage of mo)")
    status = runner.invoke(app, ["status", "mo", "--storage", url])
    assert status.exit_code == 0 and "final: test acc " in status.stdout, status.output
    out = tmp_path / "best.json"
    exported = runner.invoke(app, ["export", "mo", "--storage", url, "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    doc = json.loads(out.read_text())
    assert doc["provenance"]["final"]["test_mean"] == res["test_mean"] and doc["config"]["epochs"] == 4


def test_several_picks_each_get_their_finalists_seeds_and_model(tmp_path):
    """[final] pick = ["knee", "max_params=N"]: each pick's finalists are front trials no larger
    than it (a trial two picks share is trained once), each pick's chosen finalist is trained over
    the seeds and tested; status has a line per pick, and export --pick RULE --model writes that
    pick's model. The first pick stays the study's own result."""
    width = '[space.width]\ntype = "categorical"\nchoices = [2, 8, 32]\ntarget = "model_params.channels[1]"\n'
    path = tiny_study(tmp_path, name="mo", n_trials=8, epochs=3, pruner='name = "NopPruner"',
                      extra_study='objectives = ["val_acc", "n_params"]',
                      enqueue=BASELINE + width + '\n[final]\npick = ["knee", "max_params=2500"]\nfinalists = 2\n'
                                                 'epochs = 4\nseeds = 2\n')
    path.write_text(path.read_text().replace("low = 1e-6", "low = 3e-3"))
    spec = spec_mod.load_spec(path)
    assert spec.final.picks == ("knee", "max_params=2500")
    assert spec_mod.spec_from_dict(spec_mod.spec_to_dict(spec)) == spec
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec, url)
    assert run_worker("mo", url, device="cpu", worker_index=0).stopped_because == "final stage done"
    study, spec = study_mod.load("mo", url)
    trials = {t.number: t for t in study.get_trials()}
    first, second = finalstage.results(study, spec, 0), finalstage.results(study, spec, 1)
    assert first["done"] and second["done"] and first["pick"] == "knee" and second["pick"] == "max_params=2500"
    for res, rule in ((first, "knee"), (second, "max_params=2500")):
        picked = objectives.pick(list(trials.values()), spec.objectives, rule)
        sizes = [trials[f["source_trial"]].values[1] for f in res["finalists"] if f["source_trial"] is not None]
        assert sizes and all(size <= picked.values[1] for size in sizes), (rule, sizes, picked.values)
        assert len(res["seeds"]) == 2 and all(s["test_acc"] is not None for s in res["seeds"])
        assert {s["chosen"] for s in res["seeds"]} == {res["chosen"]["number"]}
        assert res["chosen"]["n_params"] <= picked.values[1] and res["model"] is not None
    assert second["chosen"]["n_params"] < first["chosen"]["n_params"], "the picks chose one network: no test"
    jobs = [t for t in _child_trials(url, "mo") if t.user_attrs.get("role") == "finalist"]
    assert len(first["all_finalists"]) == len(jobs) >= len(first["finalists"])
    assert ("the study's start ([[enqueue]] 1) is not a finalist of pick max_params=2500: larger than the pick"
            in first["notes"]), first["notes"]  # 3,132 params; one line naming the picks it is left out of
    assert first["picks"] == second["picks"] and [p["rule"] for p in first["picks"]] == ["knee", "max_params=2500"]
    assert len({json.dumps(t.params, sort_keys=True) for t in jobs}) == len(jobs)  # a shared finalist: one job
    status = runner.invoke(app, ["status", "mo", "--storage", url])
    assert status.exit_code == 0, status.output
    assert "final (pick knee): test acc " in status.stdout and "  pick max_params=2500: test acc " in status.stdout
    assert "cnnsearch export mo --pick max_params=2500 --model final.pt" in status.stdout
    page = runner.invoke(app, ["report", "mo", "--storage", url, "-o", str(tmp_path / "r.html")])
    assert page.exit_code == 0, page.output
    text = (tmp_path / "r.html").read_text()
    assert "<td>max_params=2500</td>" in text and f"<td>{second['test_mean']:.2%}</td>" in text
    small = tmp_path / "small.pt"
    out = runner.invoke(app, ["export", "mo", "--storage", url, "--pick", "max_params=2_500", "--model", str(small),
                              "-o", str(tmp_path / "small.json")])
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "small.json").read_text())
    assert doc["provenance"]["final"]["pick"] == "max_params=2500"
    assert doc["provenance"]["final"]["test_mean"] == second["test_mean"]
    from search.modelfile import load_model_file
    assert sum(p.numel() for p in load_model_file(small, "cpu").model.parameters()) <= 2500
    result = runner.invoke(app, ["export", "mo", "--storage", url, "--pick", "max_params=7777", "--model",
                                 str(tmp_path / "x.pt"), "-o", str(tmp_path / "x.json")])
    assert_one_line_error(result, "--model with --pick max_params=7777: study 'mo''s final stage trained the picks "
                                  "knee, max_params=2500; not this one")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("pick, fragment", [
    ("[]", "final.pick: an empty list"),
    ('["knee", "max_params=1e5", "max_params=100000"]', "final.pick: max_params=100000 is listed twice"),
    ('["knee", 300000]', "final.pick: expected a string, knee or LIMIT=NUMBER, got 300000"),
    ('["knee", "max_flops=3"]', "final.pick: expected knee or LIMIT=NUMBER"),
])
def test_a_bad_list_of_picks_is_one_line_at_load(tmp_path, pick, fragment):
    path = tiny_study(tmp_path, extra_study='objectives = ["val_acc", "n_params"]', enqueue=f"[final]\npick = {pick}\n")
    with pytest.raises(SpecError) as err:
        spec_mod.load_spec(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_finalist_carries_its_search_trials_run_on_and_ends_as_one_trained_from_the_start(tmp_path):
    """No subset and no schedule: a finalist's final config is its trial's, 4 epochs instead of 3.
    It carries the trial's kept last state on for one more epoch, and ends with exactly the
    history a run of 4 epochs from the start has; the kept states are gone after the stage."""
    from search import engine

    url, spec = _study(tmp_path)
    run_worker("fin", url, device="cpu", worker_index=0)
    res = _results(url)
    by_number = {t.number: t for t in _child_trials(url)}
    for f in res["finalists"]:
        attrs = by_number[f["number"]].user_attrs
        assert attrs["continued_from"] == {"trial": f["source_trial"], "epoch": 3}, attrs
        assert len(f["history"]) == 4 and f["epochs_done"] == 4
    chosen = res["chosen"]
    cfg = finalstage.final_config(spec, chosen["params"]).replace(device="cpu")
    fresh = engine.fit(cfg)
    assert [h["val_acc"] for h in fresh.history] == [h["val_acc"] for h in chosen["history"]]
    assert [h["train_loss"] for h in fresh.history] == [h["train_loss"] for h in chosen["history"]]
    search = study_mod.load("fin", url)[0].get_trials()
    kept = [t.number for t in search if t.user_attrs.get(finalstage.KEPT_ATTR)]
    assert {f["source_trial"] for f in res["finalists"]} <= set(kept)
    files = sorted(p.name for p in (tmp_path / "s-artifacts").iterdir())
    assert files == sorted({s["model"] for s in res["seeds"]})  # no search trial's state left


def test_a_schedule_defined_on_the_runs_length_is_never_carried_on(tmp_path):
    """cosine: its early steps depend on the run's length, so a 3-epoch trial is no prefix of a
    4-epoch run; StepLR stretched to the new length neither. Those finalists train afresh."""
    url, spec = _study(tmp_path, n_trials=3)
    assert finalstage.continues(spec, {"lr": 3e-3, "optimizer": "adam"})
    cosine = spec_mod.spec_from_dict({**spec_mod.spec_to_dict(spec), "fixed": {**spec.fixed, "scheduler": "cosine"}})
    assert not finalstage.continues(cosine, {"lr": 3e-3, "optimizer": "adam"})
    step = spec_mod.spec_from_dict({**spec_mod.spec_to_dict(spec),
                                    "fixed": {**spec.fixed, "scheduler": "step", "step_size": 2}})
    assert not finalstage.continues(step, {"lr": 3e-3, "optimizer": "adam"})  # 2 -> 3 epochs a step at 4
    unstretched = dataclasses.replace(step, final=dataclasses.replace(step.final, stretch_schedule=False))
    assert finalstage.continues(unstretched, {"lr": 3e-3, "optimizer": "adam"})
    subset = spec_mod.spec_from_dict({**spec_mod.spec_to_dict(spec), "data": {**spec.data, "subset": 200}})
    assert not finalstage.continues(subset, {"lr": 3e-3, "optimizer": "adam"})  # full_data: other images


def test_a_kept_state_that_cannot_be_read_is_one_line_and_the_finalist_trains_from_the_start(tmp_path):
    url, spec = _study(tmp_path, n_trials=4)

    def corrupt(study, trial):  # after the last search trial, before the final stage
        if trial.number == 3:
            for path in (tmp_path / "s-artifacts").iterdir():
                path.write_bytes(b"not a checkpoint")

    run_worker("fin", url, device="cpu", worker_index=0, on_trial=corrupt)
    res = _results(url)
    assert res["done"] and res["test_mean"] is not None
    by_number = {t.number: t for t in _child_trials(url)}
    search = study_mod.load("fin", url)[0].trials
    kept = [f for f in res["finalists"] if search[f["source_trial"]].user_attrs.get(finalstage.KEPT_ATTR)]
    assert kept  # the finalists' trials kept their states, which were then spoilt
    for f in kept:
        attrs = by_number[f["number"]].user_attrs
        assert "continued_from" not in attrs and attrs["carry_on_error"].endswith("; trained from the start"), attrs
        assert "\n" not in attrs["carry_on_error"] and f["epochs_done"] == 4


def test_the_summary_line_says_where_the_stage_is():
    """status and best print this line: the figure once seeds are tested, else the progress."""
    def row(state, **kw):
        return {"state": state, "source_trial": 4, "n_params": 15706, "test_acc": None, **kw}

    finalists = [row("COMPLETE"), row("RUNNING")]
    assert finalstage.summary_line({"finalists": finalists, "seeds": [], "chosen": None, "done": False,
                                    "test_mean": None}) == "final stage: 1/2 finalists trained"
    assert finalstage.summary_line({"finalists": finalists, "seeds": [], "chosen": None, "done": True,
                                    "test_mean": None}) == "final: no result (see the notes)"
    seeds = [row("COMPLETE", test_acc=0.9891), row("RUNNING"), row("WAITING")]
    res = {"finalists": finalists, "seeds": seeds, "chosen": finalists[0], "done": False,
           "test_mean": 0.9891, "test_std": None}
    assert finalstage.summary_line(res) == ("final: test acc 98.91% over 1 of 3 seeds so far "
                                            "(trial 4, 15,706 params, chosen from 2 finalists on validation)")
    seeds = [row("COMPLETE", test_acc=a) for a in (0.9891, 0.9904, 0.9889)]
    res |= {"seeds": seeds, "done": True, "test_mean": 0.9895, "test_std": 0.0008}
    assert finalstage.summary_line(res) == ("final: test acc 98.95% ± 0.08% over 3 seeds "
                                            "(trial 4, 15,706 params, chosen from 2 finalists on validation)")
    res |= {"chosen": {**finalists[0], "source_trial": None}}
    assert "(the start, 15,706 params, chosen from" in finalstage.summary_line(res)
    assert finalstage.summary_line(res | {"finalists": finalists[:1]}).endswith("chosen from 1 finalist on validation)")
    assert finalstage.summary_line({"finalists": finalists[1:], "seeds": [], "chosen": None, "done": False,
                                    "test_mean": None}) == "final stage: 0/1 finalist trained"


TWIN = "\n[final]\nfinalists = 2\nepochs = 3\nseeds = 1\nbaseline = false\nvariants = [{ lr = 0.02 }]\n"


def _trial(number: int, value: float, **params) -> optuna.trial.FrozenTrial:
    dists = {"lr": optuna.distributions.FloatDistribution(1e-6, 3e-2, log=True),
             "optimizer": optuna.distributions.CategoricalDistribution(["sgd", "adam"]),
             "momentum": optuna.distributions.FloatDistribution(0.0, 0.95)}
    t = optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params}, value=value)
    t.number = number
    return t


def test_each_search_finalist_gets_its_twin_next_to_it_and_a_start_none(tmp_path):
    spec = spec_mod.load_spec(tiny_study(tmp_path, enqueue=BASELINE + TWIN.replace("baseline = false", "baseline = 1")))
    assert spec.final.variants == ({"lr": 0.02},)
    trials = [_trial(0, 0.5, lr=3e-3, optimizer="adam"), _trial(1, 0.9, lr=1e-3, optimizer="sgd", momentum=0.9),
              _trial(2, 0.8, lr=0.02, optimizer="adam")]
    jobs, notes = finalstage.finalist_jobs(trials, spec)
    # trial 1 and its twin, trial 2 (already at lr 0.02: no twin), then the start (trial 0) as written
    assert [(j["source_trial"], j["params"], j["variant"]) for j in jobs] == [
        (1, {"lr": 1e-3, "optimizer": "sgd", "momentum": 0.9}, None),
        (1, {"lr": 0.02, "optimizer": "sgd", "momentum": 0.9}, {"lr": 0.02}),
        (2, {"lr": 0.02, "optimizer": "adam"}, None),
        (0, {"lr": 3e-3, "optimizer": "adam"}, None)]
    assert jobs[1]["rank"] == 1 and not jobs[1]["baseline"]
    assert "trial 1 with lr=0.02: a twin of trial 1 (final.variants), added as a finalist" in notes
    assert finalstage.label(jobs[1]) == "trial 1 with lr=0.02" and finalstage.label(jobs[0]) == "trial 1"
    # a twin that is another finalist's params is that finalist, not a second job
    same = [_trial(1, 0.9, lr=1e-3, optimizer="adam"), _trial(2, 0.8, lr=0.02, optimizer="adam")]
    jobs, _ = finalstage.finalist_jobs(same, spec)
    assert [(j["source_trial"], j["variant"]) for j in jobs] == [(1, None), (2, None), (None, None)]  # no trial 0 here


def test_a_twin_trains_from_the_start_and_its_label_follows_it_to_status_and_report(tmp_path):
    url, spec = _study(tmp_path, final=TWIN, n_trials=3)
    create = runner.invoke(app, ["create", str(tmp_path / "fin.toml"), "--storage", url])
    assert "the final stage: 2 finalists (each also as a twin with lr=0.02) for 3 epochs" in create.output, create.output
    one = runner.invoke(app, ["create", str(tmp_path / "fin.toml"), "--storage", f"sqlite:///{tmp_path}/one.db",
                              "--set", "final.finalists=1", "--set", "final.baseline=1"])
    assert "1 finalist (and its twin with lr=0.02) and the start for 3 epochs" in one.output, one.output
    run_worker("fin", url, device="cpu", worker_index=0)
    res = _results(url)
    assert res["done"]
    plain = [f for f in res["finalists"] if f["variant"] is None]
    twins = [f for f in res["finalists"] if f["variant"] is not None]
    assert plain and len(twins) == sum(f["params"]["lr"] != 0.02 for f in plain)  # one at lr 0.02 has none
    by_number = {t.number: t for t in _child_trials(url)}
    for f in twins:
        assert f["params"]["lr"] == 0.02 and f["state"] == "COMPLETE" and len(f["history"]) == 3
        assert "continued_from" not in by_number[f["number"]].user_attrs  # the source's kept state is not its run
    for f in plain:  # 3 epochs, no schedule: the plain finalists carry their trials' runs on
        assert by_number[f["number"]].user_attrs["continued_from"]["trial"] == f["source_trial"]
    chosen = res["chosen"]
    assert res["seeds"][0]["variant"] == chosen["variant"]
    assert res["config"]["lr"] == chosen["params"]["lr"]
    status = runner.invoke(app, ["status", "fin", "--storage", url])
    assert status.exit_code == 0 and f"({finalstage.label(chosen)}, " in status.output, status.output
    assert "a twin of trial" in status.output
    report = runner.invoke(app, ["report", "fin", "--storage", url, "-o", str(tmp_path / "r.html")])
    assert report.exit_code == 0, report.output
    assert f"trial {twins[0]['source_trial']} with lr=0.02" in (tmp_path / "r.html").read_text()
    export = runner.invoke(app, ["export", "fin", "--storage", url, "-o", str(tmp_path / "f.json")])
    assert export.exit_code == 0, export.output
    doc = json.loads((tmp_path / "f.json").read_text())
    assert doc["provenance"]["final"]["chosen_finalist"]["variant"] == chosen["variant"]
    # export's lines name what was trained: a twin's variant, and the params with it, not its trial's
    assert f"(search {finalstage.label({**chosen, 'source_trial': doc['provenance']['trial']})})" in export.output
    params_line = next(line for line in export.output.splitlines() if line.startswith("  params: "))
    assert f"lr={chosen['params']['lr']:.3g}," in params_line, export.output
    # a study warm-started from this one begins with the config its final stage chose, twin or not
    path = tmp_path / "warm.toml"
    path.write_text(tiny_study(tmp_path, name="warm", n_trials=3).read_text() + '\n[warm_start]\nstudy = "fin"\n')
    first = study_mod.warm_start_params(spec_mod.load_spec(path), open_storage(url, heartbeat_interval=None))[0][0]
    assert first == (chosen["params"], f"fin {finalstage.label(chosen)}")


def test_a_variant_may_not_change_the_network_and_variants_round_trip(tmp_path):
    width = '[space.width]\ntype = "categorical"\nchoices = [1.0, 2.0]\ntarget = "model_params.width"\n'
    path = tiny_study(tmp_path, enqueue=width + "[final]\nvariants = [{ width = 2.0 }]\n")
    path.write_text(path.read_text().replace('model = "convnet"', 'model = "cifar_threeconv_bn"'))
    with pytest.raises(SpecError, match=r"final.variants\[0\].width: sets model_params.width, the network itself"):
        spec_mod.load_spec(path)
    spec = spec_mod.load_spec(tiny_study(tmp_path, name="ok", enqueue="[final]\nvariants = [{ lr = 1e-2 }]\n"))
    doc = spec_mod.spec_to_dict(spec)
    assert doc["final"]["variants"] == [{"lr": 0.01}]
    assert spec_mod.spec_from_dict(doc) == spec == spec_mod.spec_from_dict(json.loads(json.dumps(doc)), validate=False)
    assert "variants" not in spec_mod.spec_to_dict(spec_mod.load_spec(tiny_study(tmp_path, name="no",
                                                                                enqueue="[final]\n")))["final"]


def test_with_several_picks_a_twin_serves_its_sources_picks_and_keeps_its_size(tmp_path):
    width = '[space.width]\ntype = "categorical"\nchoices = [2, 8, 32]\ntarget = "model_params.channels[1]"\n'
    path = tiny_study(tmp_path, name="mo", extra_study='objectives = ["val_acc", "n_params"]',
                      enqueue=width + '\n[final]\npick = ["knee", "max_params=700"]\nfinalists = 2\n'
                                      'variants = [{ lr = 0.02 }]\n')
    spec = spec_mod.load_spec(path)
    dists = {"lr": optuna.distributions.FloatDistribution(1e-6, 3e-2, log=True),
             "optimizer": optuna.distributions.CategoricalDistribution(["sgd", "adam"]),
             "width": optuna.distributions.CategoricalDistribution([2, 8, 32])}
    trials = []
    for number, (acc, size, w) in enumerate([(0.80, 500, 2), (0.90, 1000, 8), (0.95, 3000, 32), (0.70, 2000, 8)]):
        t = optuna.trial.create_trial(params={"lr": 1e-3, "optimizer": "adam", "width": w}, distributions=dists,
                                      values=[acc, size])
        t.number = number
        trials.append(t)
    jobs, notes = finalstage.finalist_jobs(trials, spec)
    plain = {j["source_trial"]: j for j in jobs if j["variant"] is None}
    twins = [j for j in jobs if j["variant"] is not None]
    assert sorted(j["source_trial"] for j in twins) == sorted(plain)  # one twin each, never two
    for twin in twins:
        source = plain[twin["source_trial"]]
        assert twin["picks"] == source["picks"] and twin["pick_ranks"] == source["pick_ranks"]
        assert twin["params"] == {**source["params"], "lr": 0.02}  # the same width: the same network
    assert sorted(len(j["picks"]) for j in twins) == [1, 2]  # the knee's alone; one both picks share, once
    assert [j["source_trial"] for j in jobs].count(1) == 2
