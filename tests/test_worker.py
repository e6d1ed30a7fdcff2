import optuna
import pytest
from typer.testing import CliRunner

from search import spec as spec_mod
from search import study as study_mod
from search.cli import app
from search.storage import open_storage
from search.worker import run_worker
from studykit import pg_url, start_worker, tiny_study  # noqa: F401 (fixture)

runner = CliRunner()


def states(study) -> dict:
    out = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_end_to_end_on_sqlite_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tiny_study(tmp_path, n_trials=4, enqueue='[[enqueue]]\nlr = 3e-3\noptimizer = "adam"\n')
    result = runner.invoke(app, ["create", str(path)])
    assert result.exit_code == 0 and "created" in result.stdout, result.output
    result = runner.invoke(app, ["run", str(path), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "budget reached" in result.stdout and (tmp_path / "cnnsearch.db").exists()
    result = runner.invoke(app, ["status", "tiny"])
    assert result.exit_code == 0 and "4/4 finished" in result.stdout, result.output
    result = runner.invoke(app, ["best", "tiny"])
    assert result.exit_code == 0 and "best trial" in result.stdout and "lr = " in result.stdout
    assert "tiny" in runner.invoke(app, ["list"]).stdout
    assert runner.invoke(app, ["delete", "tiny"], input="n\n").exit_code == 1
    assert runner.invoke(app, ["delete", "tiny", "--yes"]).exit_code == 0
    assert runner.invoke(app, ["status", "tiny"]).exit_code == 1


def test_status_counts_by_state_and_lists_running_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=9)), url).study
    for value in (0.4, 0.7):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    running = study.ask()
    running.set_user_attr("host", "node-3")
    running.set_user_attr("device", "cuda:1")
    running.report(0.5, 0)
    info = study_mod.summary("tiny", url)
    assert info["counts"] == {"COMPLETE": 2, "PRUNED": 1, "RUNNING": 1} and info["finished"] == 3
    assert info["best"]["number"] == 1 and info["best"]["value"] == 0.7
    assert [(r["number"], r["host"], r["device"], r["epochs"]) for r in info["running"]] == [(3, "node-3", "cuda:1", 1)]


def test_budget_is_the_studys_not_each_workers(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=3, epochs=1)), url)
    first = run_worker("tiny", url, device="cpu")
    second = run_worker("tiny", url, device="cpu")
    assert (first.trials_run, first.stopped_because) == (3, "budget reached")
    assert (second.trials_run, second.stopped_because) == (0, "budget reached")


def test_trials_record_what_happened(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    enqueue = '[[enqueue]]\nlr = 1e-6\noptimizer = "sgd"\nmomentum = 0.0\n'  # the seeds' stuck-at-chance lr
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=3, enqueue=enqueue)), url)
    run_worker("tiny", url, device="cpu")
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    stuck = study.trials[0]
    assert stuck.state == optuna.trial.TrialState.PRUNED
    assert stuck.user_attrs["stop_reason"].startswith("diverged: validation accuracy")
    for t in study.trials:
        assert {"host", "device", "precision", "n_params", "epoch_seconds", "stop_reason"} <= set(t.user_attrs)
        assert t.user_attrs["device"] == "cpu" and t.user_attrs["n_params"] > 0
        assert min(t.intermediate_values) == 0  # reports start at step 0


def test_timeout_stops_the_worker(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=500, epochs=1,
                                                   extra_study="timeout = 3")), url)
    result = run_worker("tiny", url, device="cpu")
    assert result.stopped_because == "timeout" and 0 < result.trials_run < 500


@pytest.mark.postgres
def test_three_worker_processes_share_one_budget_on_postgres(tmp_path, pg_url):
    enqueue = ('[[enqueue]]\nlr = 1e-3\noptimizer = "adam"\n'
               '[[enqueue]]\nlr = 1e-6\noptimizer = "sgd"\nmomentum = 0.0\n')
    spec = spec_mod.load_spec(tiny_study(tmp_path, n_trials=12, epochs=3, enqueue=enqueue))
    study_mod.create(spec, pg_url)
    procs = [start_worker("tiny", pg_url, "--seed-offset", str(k), log=tmp_path / f"w{k}.log")
             for k in range(3)]
    codes = [p.wait(timeout=300) for p in procs]
    logs = "\n".join((tmp_path / f"w{k}.log").read_text() for k in range(3))
    assert codes == [0, 0, 0], logs
    study = optuna.load_study(study_name="tiny", storage=open_storage(pg_url, heartbeat_interval=None))
    trials = study.get_trials(deepcopy=False)
    count = states(study)
    assert count.get("COMPLETE", 0) + count.get("PRUNED", 0) == 12, count
    assert "RUNNING" not in count and "WAITING" not in count
    assert len({t.number for t in trials}) == len(trials)
    enqueued = [t for t in trials if "fixed_params" in t.system_attrs]
    assert sorted(t.params["lr"] for t in enqueued) == [1e-6, 1e-3]
    assert count.get("PRUNED", 0) >= 1
    assert len({t.user_attrs.get("pid") for t in trials}) >= 2  # the work really was shared


def test_a_trial_over_budget_logs_one_info_line_not_a_traceback(caplog):
    from search.objective import OverBudget

    def objective(trial):
        raise OverBudget("study budget of 3 trials already taken")

    optuna.logging.enable_propagation()
    try:
        with caplog.at_level("INFO", logger="optuna"):
            optuna.create_study().optimize(objective, n_trials=1, catch=(OverBudget,))
    finally:
        optuna.logging.disable_propagation()
    records = [r for r in caplog.records if r.name == "optuna.study._optimize"]
    # (pytest may hand the same record over twice while propagation is on: compare as a set)
    assert {(r.levelname, r.getMessage()) for r in records} == {
        ("INFO", "Trial 0 not run: study budget of 3 trials already taken")}
    assert all(r.exc_info is None for r in records)
