"""Workers: pull trials from the shared study until its global budget or timeout.

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
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import optuna
from optuna.trial import TrialState

from search import spec as spec_mod
from search import study as study_mod
from search.engine import resolve_device
from search.objective import OverBudget, make_objective
from search.storage import (OPTIMIZE_LOGGER, Reconnect, Store, connection_problem, count_trials, mask_text,
                            open_store, requeue, storage_of, stored_trial, trial_id)

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


logging.getLogger(OPTIMIZE_LOGGER).addFilter(_OverBudgetLog())

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
        run.trial_id = trial_id(trial)
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
        if stored_trial(trial).state.is_finished():
            raise _Abandoned("stale", "failed as stale by another worker")
        return value

    run.trial_id = None
    return run


def _settle(study: optuna.Study, trial_id: int | None, reason: str) -> None:
    """Fail this worker's trial if it is still RUNNING, with `reason` as its stop reason, after
    queueing it again once like a dead worker's: an interrupted or cut-off trial (say the
    enqueued baseline) is not lost. The retry is queued first, so that at no moment does the
    trial's slot look free to a worker about to start a new trial."""
    storage = storage_of(study)
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


def run_worker(name: str, store: Store | str | None = None, *, device: str = "auto", seed_offset: int | None = None,
               on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
               on_epoch=None, heartbeat_interval: int | None = None,
               grace_period: int | None = None, reconnect_for: float = RECONNECT_FOR,
               on_outage: Callable[[str, float], None] | None = None) -> WorkerResult:
    """Run trials of study `name` until its budget is reached or its timeout passes.

    Args:
        name: the study (created with `cnnsearch create`).
        store: the opened storage, or its URL (None -> $CNNSEARCH_STORAGE -> SQLite file here).
        device: this worker's training device.
        seed_offset: added to the sampler's seed so workers explore differently (default: pid).
        on_trial: called as on_trial(study, trial) after each trial of this worker.
        on_epoch: progress hook (trial number, epoch, metrics).
        heartbeat_interval, grace_period: override the storage defaults (seconds) when `store`
            is a URL; an opened Store keeps its own.
        reconnect_for: how long to keep retrying when the database goes away mid-run (seconds).
        on_outage: called as on_outage(reason, seconds waited so far) before each reconnect wait.

    Raises:
        KeyboardInterrupt: on SIGINT/SIGTERM, after the running trial is marked failed (stop
            reason "interrupted") and queued again once.
        StorageError: the database stayed unreachable for `reconnect_for` seconds.
    """
    resolve_device(device)  # a bad or absent device is one error now, not a crash in every trial
    kwargs = {k: v for k, v in (("heartbeat_interval", heartbeat_interval),
                                ("grace_period", grace_period)) if v}
    store = open_store(store, **kwargs)
    url = store.url
    study, spec = study_mod.load(name, store)
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
