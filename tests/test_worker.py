import signal
import sys
import weakref

import optuna
import pytest
from typer.testing import CliRunner

from search import spec as spec_mod
from search import study as study_mod
from search.cli import app
from search.errors import DataError, TrialsCrashed
from search.storage import open_storage
from search.worker import MAX_CRASHES_IN_A_ROW, run_worker
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
    from search.errors import OverBudget

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


# --- issue 14: workers never spin, never exit 0 after failing, and always stop on a signal ---------


def _study(tmp_path, text_change=None, **kwargs) -> str:
    """The tiny study, created from its dict (file contents only: no check against the data)."""
    import tomllib

    url = f"sqlite:///{tmp_path}/s.db"
    doc = tomllib.loads(tiny_study(tmp_path, **kwargs).read_text())
    if text_change:
        text_change(doc)
    study_mod.create(spec_mod.spec_from_dict(doc), url)
    return url


def _trials(url: str):
    return optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat_interval=None)).trials


def _states(trials) -> dict:
    out = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


class _FailingSampler(optuna.samplers.RandomSampler):
    """Fails at `where` from trial 1 on, as a model-based sampler may once past its startup
    trials: the one trial drawn at create passes, then every worker's trial crashes."""

    def __init__(self, where: str, **kwargs):
        super().__init__(**kwargs)
        self.where = where

    def before_trial(self, study, trial):
        if self.where == "before_trial" and trial.number >= 1:
            raise RuntimeError("sampler cannot start\nsecond line")
        super().before_trial(study, trial)

    def sample_independent(self, study, trial, name, distribution):
        if self.where == "sample_independent" and trial.number >= 1:
            raise ValueError(f"The parameter name, {name}, is not found in the given grid.")
        return super().sample_independent(study, trial, name, distribution)

    def after_trial(self, study, trial, state, values):
        if self.where == "after_trial" and trial.number >= 1:
            raise RuntimeError("sampler cannot finish")
        super().after_trial(study, trial, state, values)


def _no_spin(limit: int = 3 * MAX_CRASHES_IN_A_ROW):
    """An on_trial hook that fails the test, instead of hanging it, once a worker spins."""
    seen = []

    def on_trial(study, trial):
        seen.append(trial.number)
        assert len(seen) <= limit, f"the worker spins: {len(seen)} trials and counting"

    return on_trial, seen


@pytest.mark.parametrize("where,error", [
    ("before_trial", "RuntimeError: sampler cannot start"),  # raised in `ask`, before the objective
    ("sample_independent", "ValueError: The parameter name, lr, is not found in the given grid."),  # suggest
    ("after_trial", "RuntimeError: sampler cannot finish"),  # raised in `tell`, after the objective
])
def test_a_sampler_error_between_ask_and_tell_counts_as_a_crash_and_never_spins(tmp_path, monkeypatch, where, error):
    url = _study(tmp_path, n_trials=20, epochs=1)  # (after_trial: the trials finish, and count)
    monkeypatch.setattr(spec_mod, "make_sampler", lambda spec, seed_offset=0: _FailingSampler(where, seed=0))
    on_trial, seen = _no_spin()
    with pytest.raises(TrialsCrashed) as info:
        run_worker("tiny", url, device="cpu", on_trial=on_trial)
    assert str(info.value) == f"{MAX_CRASHES_IN_A_ROW} trials crashed in a row, the last with {error}"
    assert seen == list(range(1 + MAX_CRASHES_IN_A_ROW))  # each trial reached on_trial once (one CLI line)
    first, *crashed = _trials(url)
    assert first.state.name in ("COMPLETE", "PRUNED") and len(crashed) == MAX_CRASHES_IN_A_ROW
    if where == "after_trial":  # the objective ran, and tell stores its trial although the sampler failed
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in crashed)
    else:
        assert all(t.state.name == "FAIL" and t.user_attrs["stop_reason"] == "crashed"
                   and t.user_attrs["error"] == error for t in crashed)
    assert "RUNNING" not in _states(crashed)


def test_crashes_in_a_row_end_the_worker_with_exit_1_and_one_line_each(tmp_path, monkeypatch):
    import search.engine

    url = _study(tmp_path, n_trials=3, epochs=1)

    def fit(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")

    monkeypatch.setattr(search.engine, "fit", fit)
    result = runner.invoke(app, ["worker", "tiny", "--storage", url, "--device", "cpu", "--quiet"])
    assert result.exit_code == 1, result.output
    why = (f"{MAX_CRASHES_IN_A_ROW} trials crashed in a row, the last with "
           "RuntimeError: CUDA error: an illegal memory access was encountered")
    assert result.stderr.strip().splitlines() == [f"error: {why}"], result.stderr
    crashed = [line for line in result.stdout.splitlines() if line.startswith("trial ")]
    assert len(crashed) == MAX_CRASHES_IN_A_ROW
    assert all(" fail " in line and "illegal memory" in line for line in crashed)
    assert "Traceback" not in result.output and "worker done" not in result.stdout


def test_a_crashed_trial_logs_one_line_not_a_traceback(caplog):
    def objective(trial):
        trial.set_user_attr("error", "RuntimeError: boom")
        raise RuntimeError("boom\nmore")

    optuna.logging.enable_propagation()
    try:
        with caplog.at_level("INFO", logger="optuna"):
            optuna.create_study().optimize(objective, n_trials=1, catch=(Exception,))
    finally:
        optuna.logging.disable_propagation()
    records = [r for r in caplog.records if r.name == "optuna.study._optimize"]
    assert {(r.levelname, r.getMessage()) for r in records} == {("INFO", "Trial 0 crashed: RuntimeError: boom")}
    assert all(r.exc_info is None for r in records)


def _bad_data(doc, **data):
    doc["data"].update(data)


@pytest.mark.parametrize("data,fragment", [
    ({"dataset": "mnist", "data_options": {}}, "mnist not found in"),
    ({"val_fraction": 0.001}, "val_fraction: 0.001 of "),  # 400 synthetic images: 0.3 of one
    ({"subset": 100_000}, "subset: 100000 is more than the "),
], ids=["dataset not found", "empty validation split", "subset too large"])
def test_a_cause_common_to_every_trial_stops_the_worker_before_its_first_trial(tmp_path, monkeypatch, data, fragment):
    monkeypatch.setenv("CNNSEARCH_DATA", str(tmp_path / "no-data-here"))
    url = _study(tmp_path, lambda doc: _bad_data(doc, **data))
    on_trial, seen = _no_spin()
    with pytest.raises(DataError, match=fragment):
        run_worker("tiny", url, device="cpu", on_trial=on_trial)
    assert _trials(url) == [] and seen == []
    result = runner.invoke(app, ["worker", "tiny", "--storage", url, "--device", "cpu", "--quiet"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output and _trials(url) == []


def _swallowed_sigint(how: str) -> None:
    """SIGINT whose KeyboardInterrupt lands where Python can only print it ('Exception ignored in
    ...') and go on: a finalizer run by the garbage collector."""
    from search.worker import _raise_interrupt

    def handler():
        _raise_interrupt(signal.SIGINT, sys._getframe())

    if how == "finalize":
        weakref.finalize(type("Doomed", (), {})(), handler)  # the object dies at once: runs the callback
    else:
        type("Doomed", (), {"__del__": lambda self: handler()})()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("moment,how", [
    ("preparing", "finalize"), ("preparing", "__del__"), ("first epoch", "finalize"), ("between trials", "__del__")])
def test_a_signal_swallowed_by_a_finalizer_still_stops_the_worker(tmp_path, monkeypatch, moment, how):
    good = '[[enqueue]]\nlr = 3e-3\noptimizer = "adam"\n'  # trains both epochs: reports epoch 0
    url = _study(tmp_path, n_trials=4, epochs=2, enqueue=good, pruner='name = "NopPruner"')
    hooks = {}
    if moment == "preparing":  # while the worker sets up its first trial
        make_pruner = spec_mod.make_pruner
        monkeypatch.setattr(spec_mod, "make_pruner", lambda spec: (_swallowed_sigint(how), make_pruner(spec))[1])
    elif moment == "first epoch":
        hooks["on_epoch"] = lambda number, epoch, m: epoch == 0 and _swallowed_sigint(how)
    else:
        hooks["on_trial"] = lambda study, trial: trial.number == 0 and _swallowed_sigint(how)
    with pytest.raises(KeyboardInterrupt):
        run_worker("tiny", url, device="cpu", **hooks)
    trials = _trials(url)
    count = _states(trials)
    assert "RUNNING" not in count, count
    if moment == "preparing":
        assert count == {"WAITING": 1}  # the enqueued trial, never started
    elif moment == "first epoch":  # stopped at the end of that epoch: failed and queued again once
        assert count == {"FAIL": 1, "WAITING": 1} and trials[0].user_attrs["stop_reason"] == "interrupted"
    else:
        assert len(trials) == 1 and count.get("FAIL", 0) == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigint_swallowed_while_python_imported_stops_the_worker_on_entry(tmp_path):
    """Before the worker's handlers exist (its imports take a second or two), search/__init__.py's
    handler records a SIGINT and raises; where that KeyboardInterrupt is swallowed (an import's
    `except BaseException`, a finalizer), the worker must still stop before its first trial."""
    import search

    url = _study(tmp_path, n_trials=4, epochs=2, enqueue='[[enqueue]]\nlr = 3e-3\noptimizer = "adam"\n',
                 pruner='name = "NopPruner"')
    weakref.finalize(type("Doomed", (), {})(), search._record_then_interrupt, signal.SIGINT, None)
    assert search.early_signals == [signal.SIGINT]
    with pytest.raises(KeyboardInterrupt):
        run_worker("tiny", url, device="cpu")
    assert _states(_trials(url)) == {"WAITING": 1} and search.early_signals == []


# Worker indices: the sampler's seed offset, recorded; a study replays ------------------------

def _params(url, name="tiny"):
    study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_interval=None))
    return study, [(t.number, t.params) for t in study.trials]


def test_run_twice_into_fresh_databases_draws_the_same_trials(tmp_path, monkeypatch):
    """TPE with seed 0 and 3 random startup trials: trials 3 and 4 are TPE's own, from the values."""
    import torch

    threads, before = [], torch.get_num_threads()
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (threads.append(n), set_threads(n))[1])
    path = tiny_study(tmp_path, n_trials=5, epochs=1, pruner='name = "NopPruner"')
    runs = []
    try:
        for k in (1, 2):
            url = f"sqlite:///{tmp_path}/run{k}.db"
            result = runner.invoke(app, ["run", str(path), "--storage", url, "--device", "cpu", "--quiet",
                                         "--threads", "1"])
            assert result.exit_code == 0, result.output
            assert "worker index 0, sampler seed 0" in result.stdout
            runs.append(_params(url))
    finally:
        set_threads(before)
    (first, drawn), (_, again) = runs
    assert len(drawn) == 5 and drawn == again
    assert threads and set(threads) == {1}  # run --threads
    for t in first.trials:
        assert (t.user_attrs["worker_index"], t.user_attrs["sampler_seed"]) == (0, 0)
    assert first.user_attrs["worker_index:0"]["pid"] > 0  # the index, claimed and recorded with the study


def test_workers_with_different_indices_draw_different_first_trials(tmp_path):
    firsts = {}
    for index in (0, 1):
        url = f"sqlite:///{tmp_path}/w{index}.db"
        study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=1, epochs=1)), url)
        result = run_worker("tiny", url, device="cpu", worker_index=index)
        assert (result.worker_index, result.sampler_seed) == (index, index)
        study, ((_, params),) = _params(url)
        firsts[index] = params
        assert (study.trials[0].user_attrs["worker_index"], study.trials[0].user_attrs["sampler_seed"]) == (index, index)
    assert firsts[0] != firsts[1]


def test_worker_option_records_its_index_and_seed_offset_still_works(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=2, epochs=1)), url)
    result = runner.invoke(app, ["worker", "tiny", "--storage", url, "--device", "cpu", "--quiet",
                                 "--worker-index", "7"])
    assert result.exit_code == 0 and "worker index 7, sampler seed 7" in result.stdout, result.output
    study, _ = _params(url)
    assert {t.user_attrs["worker_index"] for t in study.trials} == {7}
    result = runner.invoke(app, ["worker", "tiny", "--storage", url, "--device", "cpu", "--quiet",
                                 "--seed-offset", "3"])
    assert result.exit_code == 0 and "worker index 3, sampler seed 3" in result.stdout, result.output
    result = runner.invoke(app, ["worker", "tiny", "--storage", url, "--device", "cpu", "--quiet"])
    assert result.exit_code == 0 and "worker index 8, sampler seed 8" in result.stdout, result.output


def test_claimed_indices_are_never_shared_even_when_claimed_at_once(tmp_path):
    import threading

    from search.storage import open_store
    from search.worker import claim_worker_index

    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path)), url)
    studies = [study_mod.load("tiny", open_store(url, heartbeat_interval=None))[0] for _ in range(8)]
    claimed, start = [], threading.Barrier(len(studies))

    def claim(study):
        start.wait()
        claimed.append(claim_worker_index(study))

    threads = [threading.Thread(target=claim, args=(s,)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(8))
    assert claim_worker_index(studies[0], 3) == 3  # given: recorded, even if taken (a deliberate replay)
    assert claim_worker_index(studies[0]) == 8
    memory = optuna.create_study()  # in-memory storage: one process
    assert [claim_worker_index(memory) for _ in range(2)] == [0, 1]


def test_sampler_seed_wraps_and_is_none_without_a_seed(tmp_path):
    from search.worker import sampler_seed

    spec = spec_mod.load_spec(tiny_study(tmp_path))
    assert sampler_seed(spec, 0) == 0 and sampler_seed(spec, 5) == 5
    spec.sampler.kwargs["seed"] = 2**32 - 1
    assert sampler_seed(spec, 2) == 1
    del spec.sampler.kwargs["seed"]
    assert sampler_seed(spec, 2) is None


def test_status_shows_each_running_trials_worker_index(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = study_mod.create(spec_mod.load_spec(tiny_study(tmp_path)), url).study
    running = study.ask()
    for key, value in (("host", "node-3"), ("device", "cuda:1"), ("worker_index", 2), ("sampler_seed", 2)):
        running.set_user_attr(key, value)
    result = runner.invoke(app, ["status", "tiny", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "running: trial 0 on node-3 cuda:1, worker 2 (sampler seed 2)" in result.stdout


def test_a_pruned_trials_stop_reason_counts_epochs_from_1(tmp_path):
    """Optuna's steps count from 0 (the pruner's n_warmup_steps); the stop reason people read, from 1."""
    from search.objective import make_objective

    spec = spec_mod.load_spec(tiny_study(tmp_path, epochs=3), ["fixed.warmup_epochs=5"])  # no divergence check
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(upper=-1.0))
    study.optimize(make_objective(spec, device="cpu"), n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [0]
    assert trial.user_attrs["stop_reason"] == "pruned after epoch 1"
