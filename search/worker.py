"""Workers: pull trials from the shared study until its global budget or timeout; launch many.

A worker exits only when the study has its budget of finished (complete + pruned) trials, or
its timeout has passed. While the remaining slots are held by other workers' running trials it
waits and keeps failing stale ones (their worker died), so a dead worker's trial is retried
by a live one instead of being lost. A signal or a database outage fails the running trial
and queues it again once; the worker reconnects for a bounded time (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import optuna
from optuna.trial import TrialState

from search import spec as spec_mod
from search import study as study_mod
from search.engine import resolve_device
from search.objective import OverBudget, make_objective
from search.storage import Reconnect, connection_problem, count_trials, mask_text, requeue, storage_url

POLL_SECONDS = 2.0
MAX_CRASHES_IN_A_ROW = 5  # a space where every trial crashes is a bug to fix, not to loop on
RECONNECT_FOR = 60.0  # seconds a worker keeps retrying a lost database before it gives up


@dataclass
class WorkerResult:
    trials_run: int
    stopped_because: str  # "budget reached" | "timeout" | "N crashes in a row: <error>"


class _Abandoned(BaseException):
    """This worker's trial cannot go on: interrupted, its database connection dropped, or failed
    as stale by another worker. A BaseException so that Optuna neither catches it nor marks
    the trial failed itself (on a dead connection, or before its retry is queued)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason  # kind: "interrupted" | "outage" | "stale"


def _deadline(study: optuna.Study, timeout: float | None) -> float | None:
    """The study's timeout counts from its first worker's start, whichever machine that was."""
    if not timeout:
        return None
    started = study.user_attrs.get("first_worker_at")
    if started is None:
        started = datetime.now(timezone.utc).isoformat()
        study.set_user_attr("first_worker_at", started)
    elapsed = (datetime.now(timezone.utc) - datetime.fromisoformat(started)).total_seconds()
    return time.monotonic() + timeout - elapsed


class _OverBudgetLog(logging.Filter):
    """A trial over budget is a race lost at the end of a study, not an error: Optuna's warning
    with a traceback (and its 'failed with value None' line) becomes one info line."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        number = re.match(r"Trial (\d+) failed with", str(record.msg))
        if isinstance(exc, OverBudget) and number:
            self.numbers.add(number.group(1))
            record.msg, record.args, record.exc_info, record.exc_text = (
                f"Trial {number.group(1)} not run: {exc}", (), None, None)
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        return not (number and number.group(1) in self.numbers and "failed with value" in str(record.msg))


logging.getLogger("optuna.study._optimize").addFilter(_OverBudgetLog())

_DATABASE_MODULES = ("sqlalchemy.", "optuna.storages.", "psycopg.", "sqlite3.")
_pending: list[int] = []  # a signal waiting for the main thread to leave a database call


def _raise_interrupt(signum, frame):
    """SIGINT/SIGTERM (a scheduler's stop is Ctrl-C) -> KeyboardInterrupt, but never inside a
    database call: an exception there can leave a transaction open, and a SQLite lock held,
    that the clean-up would then wait on. There the signal is retried every 50 ms (SIGALRM)."""
    if signum == signal.SIGALRM:
        if not _pending:
            return
        signum = _pending[0]
    calls = frame
    while calls is not None and not calls.f_globals.get("__name__", "").startswith(_DATABASE_MODULES):
        calls = calls.f_back
    if calls is not None:
        _pending[:] = [signum]
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    _pending.clear()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interrupted(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


def _guarded(objective):
    """The objective, remembering the trial it runs and turning what is not the trial's fault
    (a signal, a lost database, a stale-check takeover) into `_Abandoned`."""

    def run(trial: optuna.Trial) -> float:
        run.trial_id = trial._trial_id
        try:
            value = objective(trial)
        except KeyboardInterrupt as exc:
            raise _Abandoned("interrupted", str(exc)) from exc
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            raise _Abandoned("stale", str(exc)) from exc
        except Exception as exc:
            outage = connection_problem(exc)
            if outage is not None:
                raise _Abandoned("outage", outage) from exc
            raise
        if trial.study._storage.get_trial(trial._trial_id).state.is_finished():
            raise _Abandoned("stale", "failed as stale by another worker")
        return value

    run.trial_id = None
    return run


def _settle(study: optuna.Study, trial_id: int | None, reason: str) -> None:
    """Fail this worker's trial if it is still RUNNING, with `reason` as its stop reason, after
    queueing it again once like a dead worker's: an interrupted or cut-off trial (say the
    enqueued baseline) is not lost. The retry is queued first, so that at no moment does the
    trial's slot look free to a worker about to start a new trial."""
    storage = study._storage
    if trial_id is None or storage.get_trial(trial_id).state != TrialState.RUNNING:
        return
    retry_id = None
    try:
        storage.set_trial_user_attr(trial_id, "stop_reason", reason)
        retry_id = requeue(study, storage.get_trial(trial_id))
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Another worker's stale check failed it first and queued its own retry: drop ours.
        if retry_id is not None and storage.get_trial(retry_id).state == TrialState.WAITING:
            storage.set_trial_user_attr(retry_id, "stop_reason", "duplicate retry")
            storage.set_trial_state_values(retry_id, state=TrialState.FAIL)


def run_worker(name: str, url: str | None = None, *, device: str = "auto", seed_offset: int | None = None,
               on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
               on_epoch=None, heartbeat_interval: int | None = None,
               grace_period: int | None = None, reconnect_for: float = RECONNECT_FOR,
               on_outage: Callable[[str, float], None] | None = None) -> WorkerResult:
    """Run trials of study `name` until its budget is reached or its timeout passes.

    Args:
        name: the study (created with `cnnsearch create`).
        url: storage URL (None -> $CNNSEARCH_STORAGE -> SQLite file here).
        device: this worker's training device.
        seed_offset: added to the sampler's seed so workers explore differently (default: pid).
        on_trial: called as on_trial(study, trial) after each trial of this worker.
        on_epoch: progress hook (trial number, epoch, metrics).
        heartbeat_interval, grace_period: override the storage defaults (seconds).
        reconnect_for: how long to keep retrying when the database goes away mid-run (seconds).
        on_outage: called as on_outage(reason, seconds waited so far) before each reconnect wait.

    Raises:
        KeyboardInterrupt: on SIGINT/SIGTERM, after the running trial is marked failed (stop
            reason "interrupted") and queued again once.
        StorageError: the database stayed unreachable for `reconnect_for` seconds.
    """
    url = storage_url(url)
    resolve_device(device)  # a bad or absent device is one error now, not a crash in every trial
    kwargs = {k: v for k, v in (("heartbeat_interval", heartbeat_interval),
                                ("grace_period", grace_period)) if v}
    study, spec = study_mod.load(name, url, **kwargs)
    offset = os.getpid() if seed_offset is None else seed_offset
    study.sampler = spec_mod.make_sampler(spec, seed_offset=offset)
    study.pruner = spec_mod.make_pruner(spec)
    objective = _guarded(make_objective(spec, device=device, on_epoch=on_epoch))
    deadline = _deadline(study, spec.timeout)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
    previous = {s: signal.getsignal(s) for s in handled} if _main_thread() else {}
    for s in previous:  # SIGINT too: a worker started in the background by a script inherits it ignored
        signal.signal(s, _raise_interrupt)
    crashes: list[str] = []
    reconnect = Reconnect(url, reconnect_for)

    def after_trial(study_, trial):
        failed = trial.state == TrialState.FAIL and "error" in trial.user_attrs
        crashes[:] = crashes + [trial.user_attrs["error"]] if failed else []
        if on_trial:
            on_trial(study_, trial)

    def step() -> WorkerResult | None:
        if len(crashes) >= MAX_CRASHES_IN_A_ROW:
            return WorkerResult(run, f"{len(crashes)} crashes in a row: {crashes[-1]}")
        finished = count_trials(study, ("COMPLETE", "PRUNED"))
        if finished >= spec.n_trials:
            return WorkerResult(run, "budget reached")
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return WorkerResult(run, "timeout")
        claimable = count_trials(study, ("WAITING",))
        in_flight = count_trials(study, ("RUNNING",))
        if claimable or finished + in_flight < spec.n_trials:
            study.optimize(objective, n_trials=1, timeout=left, callbacks=[after_trial],
                           catch=(OverBudget, Exception))
            return None
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial -> retried, WAITING
        time.sleep(POLL_SECONDS)
        return None

    run = 0
    try:
        while True:
            objective.trial_id = None
            try:
                done = step()
            except _Abandoned as abandoned:
                if abandoned.kind == "interrupted":
                    raise KeyboardInterrupt(abandoned.reason) from None
                run += 1
                if abandoned.kind == "stale":  # another worker failed it and queued it again
                    continue
                reason = abandoned.reason
            except Exception as exc:
                if _interrupted(exc):  # Optuna turns a Ctrl-C during its tell into UnboundLocalError
                    raise KeyboardInterrupt("interrupted") from exc
                reason = connection_problem(exc)
                if reason is None:
                    raise
                run += objective.trial_id is not None
            else:
                reconnect.ok()
                if done is not None:
                    return done
                run += objective.trial_id is not None
                continue
            while True:  # the database is gone: wait, then settle the trial it cut off
                if on_outage:
                    on_outage(mask_text(reason, url), reconnect.waited())
                reconnect.wait(reason)
                try:
                    _settle(study, objective.trial_id, "storage outage")
                    break
                except Exception as exc:
                    reason = connection_problem(exc)
                    if reason is None:
                        raise
    except KeyboardInterrupt:
        for s in previous:  # a second signal must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        with contextlib.suppress(Exception):  # database gone too: the heartbeat settles it later
            _settle(study, objective.trial_id, "interrupted")
        raise
    finally:
        if previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def visible_gpus(gpus: str) -> list[str]:
    """`all` -> every CUDA device index; `0,2` -> those. Raises ValueError on a bad list."""
    if gpus == "all":
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise ValueError(f"--gpus: expected 'all' or a list like 0,1, got {gpus!r}")
    return ids


@dataclass(frozen=True)
class Slot:
    device: str
    env: dict
    log: Path


def plan_slots(gpus: str | None, per_gpu: int, cpus: int | None, log_dir: Path) -> list[Slot]:
    """One worker per GPU slot (CUDA_VISIBLE_DEVICES), or `cpus` CPU workers sharing the cores
    with torch threads split between them so the machine is never oversubscribed."""
    ids = visible_gpus(gpus) if gpus else []
    if gpus and not ids:
        raise ValueError("--gpus all: no CUDA device found on this machine; use --cpus N")
    slots = []
    if ids:
        for gpu in ids:
            for k in range(per_gpu):
                env = {"CUDA_VISIBLE_DEVICES": gpu}
                slots.append(Slot("cuda:0", env, log_dir / f"worker-gpu{gpu}-{k}.log"))
        return slots
    n = cpus or 1
    threads = max(1, (os.cpu_count() or 1) // n)
    for k in range(n):
        env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads),
               "CNNSEARCH_THREADS": str(threads)}
        slots.append(Slot("cpu", env, log_dir / f"worker-cpu{k}.log"))
    return slots


def launch(name: str, url: str | None, slots: list[Slot], *, worker_args: Sequence[str] = (),
           on_start: Callable[[int, Slot, int], None] | None = None) -> list[int]:
    """Start one `cnnsearch worker` process per slot and wait; Ctrl-C/SIGTERM reach every worker.

    Args:
        worker_args: more `cnnsearch worker` options for every worker (e.g. --heartbeat 5).

    Returns the workers' exit codes.
    """
    url = storage_url(url)
    procs = []
    for k, slot in enumerate(slots):
        slot.log.parent.mkdir(parents=True, exist_ok=True)
        # The URL goes in the environment, not argv: `ps` shows every user a command line.
        cmd = [sys.executable, "-m", "search.cli", "worker", name,
               "--device", slot.device, "--quiet", "--seed-offset", str(k), *worker_args]
        log = open(slot.log, "ab")
        env = {**os.environ, **slot.env, "CNNSEARCH_STORAGE": url}
        procs.append(subprocess.Popen(cmd, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
        if on_start:
            on_start(k, slot, procs[-1].pid)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return [p.wait() for p in procs]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


