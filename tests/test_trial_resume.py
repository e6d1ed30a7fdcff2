"""A retried trial resumes from its last checkpoint (search.artifacts): killed or interrupted
workers, a corrupt checkpoint, checkpoints of finished trials removed, where the store is.

Run with `-s` to see the measured numbers each test prints as `[resume] ...`.
"""

from __future__ import annotations

import functools
import signal
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search import artifacts, datasets, engine, space
from search import spec as spec_mod
from search import study as study_mod
from search.errors import CnnsearchError
from search.storage import open_storage
from search.worker import run_worker
from studykit import quick_study, start_worker, stop_all, tiny_study

EPOCHS = 12
KILL_EPOCHS = 80  # a tiny epoch takes about 0.05 s: long enough to catch the trial mid-run
BASELINE = '[[enqueue]]\nlr = 3e-3\noptimizer = "adam"\n'
FAST_HEARTBEAT = ("--heartbeat", "1", "--grace", "4")


def note(text: str) -> None:
    print(f"[resume] {text}")


def _study(tmp_path: Path, epochs: int = EPOCHS) -> tuple[str, spec_mod.StudySpec, Path]:
    """One enqueued trial of EPOCHS epochs, no pruning, val_loss as the metric (a float that shows
    any difference in training, unlike accuracy on 80 images); its URL, spec and artifact dir."""
    spec = spec_mod.load_spec(tiny_study(tmp_path, n_trials=1, epochs=epochs, pruner='name = "NopPruner"',
                                         enqueue=BASELINE, extra_study='metric = "val_loss"'))
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec, url)
    return url, spec, tmp_path / "s-artifacts"


@functools.cache
def _reader(url: str):
    return open_storage(url, heartbeat_interval=None)


def trials_of(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tiny", storage=_reader(url)).get_trials(deepcopy=False)


def reference(spec, params: dict, threads: int | None = None) -> list[float]:
    """val_loss per epoch of the same config trained without interruption, in this process."""
    cfg = space.params_to_config(spec, params).replace(device="cpu")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # as the worker process trains (--threads 1)
    try:
        result = engine.fit(cfg, dataset=datasets.dataset_for(cfg))
    finally:
        torch.set_num_threads(before)
    assert result.stop_reason == "finished"
    return [h["val_loss"] for h in result.history]


def check_retry(trials, original: int, k: int, expected: list[float]):
    """The retry of `original` resumed from epoch k and reports every step once, as an
    uninterrupted run does; returns it."""
    by_number = {t.number: t for t in trials}
    assert by_number[original].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == original]
    assert len(retries) == 1, [(t.number, t.state) for t in trials]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE, retry.user_attrs
    assert retry.user_attrs["resumed_from_epoch"] == k
    assert sorted(retry.intermediate_values) == list(range(len(expected)))  # steps 0..N-1, each once
    assert [retry.intermediate_values[s] for s in range(len(expected))] == expected  # bit for bit
    assert retry.value == min(expected)
    return retry


def interrupt_at(epoch: int):
    """A worker progress hook that interrupts (as SIGTERM does) the first trial at `epoch`."""
    fired = []

    def hook(number, e, m):
        if e == epoch and not fired:
            fired.append(e)
            raise KeyboardInterrupt("SIGTERM")

    return hook


def wait_for_checkpointed_trial(url: str, victim, log: Path, seconds: float = 120):
    """The running trial, once it has a checkpoint and 3+ epochs reported (the victim alive)."""
    deadline = time.monotonic() + seconds
    while True:
        assert time.monotonic() < deadline and victim.poll() is None, log.read_text()
        running = [t for t in trials_of(url) if t.state == TrialState.RUNNING]
        if (running and artifacts.CHECKPOINT_ATTR in running[0].user_attrs
                and len(running[0].intermediate_values) >= 3):
            return running[0]
        time.sleep(0.1)


def test_a_killed_workers_trial_resumes_from_its_last_checkpoint(tmp_path):
    url, spec, where = _study(tmp_path, KILL_EPOCHS)
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    victim = start_worker("tiny", url, *FAST_HEARTBEAT, log=logs[0])
    survivor = None
    try:
        running = [wait_for_checkpointed_trial(url, victim, logs[0])]
        time.sleep(0.05)  # into the next epoch
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait()
        doomed = {t.number: t for t in trials_of(url)}[running[0].number]
        reported = len(doomed.intermediate_values)
        saved = artifacts.CheckpointStore(where).load(doomed.user_attrs[artifacts.CHECKPOINT_ATTR], "the checkpoint")
        k = saved["state"]["progress"]["epoch"]
        assert 2 <= k <= reported < KILL_EPOCHS
        survivor = start_worker("tiny", url, *FAST_HEARTBEAT, log=logs[1])
        assert survivor.wait(timeout=180) == 0, logs[1].read_text()
        took = time.monotonic() - killed_at
    finally:
        stop_all((victim, survivor))
    retry = check_retry(trials_of(url), doomed.number, k, reference(spec, doomed.params, threads=1))
    assert "resume_error" not in retry.user_attrs
    assert list(where.iterdir()) == []  # the original's last checkpoint and all of the retry's: gone
    note(f"SIGKILL with {reported} epochs reported, checkpoint at epoch {k}: retry {retry.number} resumed from "
         f"epoch {k} (epochs lost: {reported - k} reported + the one in progress), finished {took:.1f} s "
         f"after the kill (grace 4 s); values equal an uninterrupted run's")


def test_an_interrupted_trial_resumes_bit_for_bit(tmp_path):
    """SIGTERM's path (the worker's KeyboardInterrupt at its safe point after an epoch's report,
    where a signal that arrived during a database call lands): the trial is failed and requeued;
    the next worker resumes it from its last checkpoint, which already holds that epoch."""
    url, spec, where = _study(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_worker("tiny", url, device="cpu", seed_offset=0, on_epoch=interrupt_at(4))
    trials = trials_of(url)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert len(list(where.iterdir())) == 1  # one checkpoint per trial, kept for the retry
    assert len(trials[0].intermediate_values) == 5
    run_worker("tiny", url, device="cpu", seed_offset=0)
    retry = check_retry(trials_of(url), 0, 5, reference(spec, trials[0].params))  # epoch 4 was saved: none lost
    assert "resume_error" not in retry.user_attrs
    assert list(where.iterdir()) == []


def test_a_corrupt_checkpoint_is_one_line_and_the_retry_trains_from_scratch(tmp_path):
    url, spec, where = _study(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_worker("tiny", url, device="cpu", seed_offset=0, on_epoch=interrupt_at(3))
    original = trials_of(url)[0]
    (where / original.user_attrs[artifacts.CHECKPOINT_ATTR]).write_bytes(b"half a checkpoint")
    run_worker("tiny", url, device="cpu", seed_offset=0)
    retry = check_retry(trials_of(url), 0, 0, reference(spec, original.params))
    error = retry.user_attrs["resume_error"]
    assert "trial 0's checkpoint" in error and "trained from scratch" in error and "\n" not in error
    assert list(where.iterdir()) == []  # the corrupt file went with the retry's first own checkpoint


def test_where_the_artifact_store_is(tmp_path, monkeypatch):
    monkeypatch.delenv(artifacts.ARTIFACTS_ENV, raising=False)
    db = tmp_path / "runs" / "search.db"
    assert artifacts.artifact_dir(f"sqlite:///{db}") == tmp_path / "runs" / "search-artifacts"
    assert artifacts.artifact_dir("postgresql+psycopg://u@host/db") is None  # no default: off
    assert artifacts.artifact_dir("sqlite:///:memory:") is None
    assert artifacts.artifact_dir("postgresql+psycopg://u@host/db", tmp_path / "shared") == tmp_path / "shared"
    assert artifacts.artifact_dir(f"sqlite:///{db}", "none") is None
    monkeypatch.setenv(artifacts.ARTIFACTS_ENV, str(tmp_path / "env"))
    assert artifacts.artifact_dir("postgresql+psycopg://u@host/db") == tmp_path / "env"
    assert artifacts.artifact_dir(f"sqlite:///{db}", tmp_path / "given") == tmp_path / "given"
    assert artifacts.artifact_dir(f"sqlite:///{db}", "s3://bucket/checkpoints/") == "s3://bucket/checkpoints"
    with pytest.raises(CnnsearchError, match="only a directory"):
        artifacts.artifact_dir(f"sqlite:///{db}", "gs://bucket/checkpoints")


def test_finished_trials_leave_no_checkpoints(tmp_path, monkeypatch):
    monkeypatch.delenv(artifacts.ARTIFACTS_ENV, raising=False)
    quick_study(tmp_path, n_trials=2)  # a real worker, both trials complete
    where = tmp_path / "study-artifacts"
    assert where.is_dir() and list(where.iterdir()) == []
    trials = trials_of(f"sqlite:///{tmp_path / 'study.db'}")
    assert all(artifacts.CHECKPOINT_ATTR in t.user_attrs and "resumed_from_epoch" not in t.user_attrs for t in trials)


def test_the_end_of_a_line_of_retries_removes_every_checkpoint_it_left(tmp_path):
    """A worker killed between saving a new checkpoint and removing the old one leaves the old
    file behind; the end of the trial's retry removes it too, so the directory stays bounded."""
    import optuna

    from search.artifacts import CheckpointStore, TrialCheckpoint

    store = CheckpointStore(tmp_path / "a")
    study = optuna.create_study(study_name="s")
    original, retry, other = study.ask(), study.ask(), study.ask()
    orphan = store.save(_tiny_state(), prefix=TrialCheckpoint(original, store, {}).prefix)
    last = store.save(_tiny_state(), prefix=TrialCheckpoint(original, store, {}).prefix)
    kept = store.save(_tiny_state(), prefix=TrialCheckpoint(other, store, {}).prefix)
    TrialCheckpoint(retry, store, {"checkpoint": last}, first=original.number).drop()
    assert sorted(p.name for p in (tmp_path / "a").glob("*.pt")) == [kept]
    assert orphan != last


def _tiny_state():
    from search import datasets, engine
    from search.config import RunConfig

    cfg = RunConfig(dataset="digits", epochs=1, device="cpu", model_params={"channels": [4], "fc": []})
    return engine.TrainState.start(cfg, datasets.dataset_for(cfg))
