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
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import optuna
from optuna.trial import TrialState

import search
from search import cores, datasets, finalstage, space
from search.artifacts import CheckpointStore, open_artifacts
from search import spec as spec_mod
from search import study as study_mod
from search.engine import resolve_device
from search.errors import OverBudget, StudyGone, TrialsCrashed, first_line
from search.objective import make_objective
from search.storage import (OPTIMIZE_LOGGER, UID_ATTR, Reconnect, Store, check_study, claim_numbered_attr, connection_problem,
                            count_trials,
                            mask_text, open_store, requeue, started_trial, storage_of, stored_trial, trial_id,
                            unwatch_study, watch_study)

POLL_SECONDS = 2.0
MAX_CRASHES_IN_A_ROW = 5  # a space where every trial crashes is a bug to fix, not to loop on
RECONNECT_FOR = 60.0  # seconds a worker keeps retrying a lost database before it gives up


@dataclass
class WorkerResult:
    trials_run: int
    stopped_because: str  # "budget reached" | "timeout" | "final stage done" (crashes in a row raise TrialsCrashed)
    worker_index: int | None = None  # this worker's index (claim_worker_index)
    sampler_seed: int | None = None  # the seed its sampler drew with (None: the sampler has none)


class _Abandoned(BaseException):
    """This worker's trial cannot go on: interrupted, its database connection dropped, or failed
    as stale by another worker. A BaseException so that Optuna neither catches it nor marks
    the trial failed itself (on a dead connection, or before its retry is queued)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason  # kind: "interrupted" | "outage" | "stale" | "gone"


def _gone(study: optuna.Study) -> str | None:
    """One line if the study this worker runs on was deleted (or replaced) under it, else None
    (also when the database cannot say: the error at hand then decides)."""
    try:
        check_study(study)
    except StudyGone as exc:
        return str(exc)
    except Exception:  # noqa: BLE001
        return None
    return None


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


WORKER_ATTR = "worker_index:"  # study user attr per index taken: "worker_index:3" -> {"host", "pid", "at"}


def sampler_seed(spec, worker_index: int) -> int | None:
    """The seed a worker's sampler draws with: the study's `sampler.kwargs.seed` shifted by the
    worker index, modulo 2**32 (`spec.make_sampler`); None for a sampler without a seed."""
    kwargs = spec.sampler.kwargs
    return (kwargs["seed"] + worker_index) % spec_mod.SEEDS if "seed" in kwargs else None


def claim_worker_index(study: optuna.Study, index: int | None = None) -> int:
    """This worker's index in `study`: the offset added to the sampler's seed (`sampler_seed`).

    A given index is recorded (study user attr `worker_index:<k>`: host, pid, time) and returned;
    the same index replays the same draws. None takes the index after the highest recorded one,
    atomically (`storage.claim_numbered_attr`), so two workers, on one machine or many, never
    share an index by accident; every index ever used stays recorded.
    """
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if index is not None:
        study.set_user_attr(f"{WORKER_ATTR}{index}", holder)
        return index
    return claim_numbered_attr(study, WORKER_ATTR, holder)


class _OverBudgetLog(logging.Filter):
    """A trial over budget is a race lost at the end of a study, not an error: Optuna's warning
    with a traceback (and its 'failed with value None' line) becomes one info line. So does a
    crashed trial's (its error's first line, as the trial records it and the CLI shows it):
    five tracebacks of the same error say less than five lines and the worker's one error."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        number = re.match(r"Trial (\d+) failed with", str(record.msg))
        if isinstance(exc, Exception) and number:
            why = f"not run: {exc}" if isinstance(exc, OverBudget) else f"crashed: {first_line(exc, with_type=True)}"
            self.numbers.add(number.group(1))
            record.msg, record.args, record.exc_info, record.exc_text = (
                f"Trial {number.group(1)} {why}", (), None, None)
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        return not (number and number.group(1) in self.numbers and "failed with value" in str(record.msg))


logging.getLogger(OPTIMIZE_LOGGER).addFilter(_OverBudgetLog())

_DATABASE_MODULES = ("sqlalchemy.", "optuna.storages.", "psycopg.", "sqlite3.")
_pending: list[int] = []  # a signal waiting for the main thread to leave a database call
_signalled: list[int] = []  # the signal received, kept until the worker stops (see _check_signals)
_installed: list[bool] = []  # stop_on_signals nesting: only the outermost installs and restores
_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)


def _raise_interrupt(signum, frame):
    """SIGINT/SIGTERM (a scheduler's stop is Ctrl-C) -> KeyboardInterrupt, but never inside a
    database call: an exception there can leave a transaction open, and a SQLite lock held,
    that the clean-up would then wait on. There the signal is retried every 50 ms (SIGALRM)."""
    if signum == signal.SIGALRM:
        if not _pending:
            return
        signum = _pending[0]
    else:  # remembered, in case the KeyboardInterrupt below is lost (see _check_signals)
        _signalled[:] = [signum]
    calls = frame
    while calls is not None and not calls.f_globals.get("__name__", "").startswith(_DATABASE_MODULES):
        calls = calls.f_back
    if calls is not None:
        _pending[:] = [signum]
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    _pending.clear()
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _check_signals() -> None:
    """A safe point (before each trial, after each epoch, after each trial): a signal whose
    KeyboardInterrupt was lost stops the worker here. Raised inside a finalizer or a garbage-
    collector callback, as it can be in a worker's first seconds, a KeyboardInterrupt is
    printed as "Exception ignored" and dropped, and the worker would run the whole study."""
    if _signalled:
        _pending.clear()  # the deferred retry (SIGALRM), if any, has nothing left to do
        raise KeyboardInterrupt(signal.Signals(_signalled[0]).name)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM stop what runs inside (`_raise_interrupt`, `_check_signals`): the
    handlers are installed on entry and the previous ones restored on exit, in the main thread
    only. SIGINT too: a worker started in the background by a script inherits it ignored. A
    decorator as well (run_worker); nested uses are one, so a command can install them before
    its own preparations and the worker inside keeps them."""
    if _installed or not _main_thread():
        yield
        return
    _signalled[:] = search.early_signals[:1]  # one that came while Python imported (search/__init__.py)
    search.early_signals.clear()
    _pending.clear()
    previous = {s: signal.getsignal(s) for s in _HANDLED}
    _installed.append(True)
    try:
        for s in _HANDLED:
            signal.signal(s, _raise_interrupt)
        _check_signals()
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)
        _installed.clear()
        _pending.clear()


def _checking(on_epoch, share: cores.CoreShare | None = None):
    """The objective's epoch hook: the caller's progress hook, then a safe point, where a
    launched CPU worker also takes its share of the machine's cores (search/cores.py)."""

    def hook(number: int, epoch: int, metrics: dict) -> None:
        if on_epoch is not None:
            on_epoch(number, epoch, metrics)
        _check_signals()
        if share is not None:
            share.epoch(metrics.get("samples_per_s"))

    return hook


def _preflight(spec) -> None:
    """What would fail every trial alike stops the worker before its first (the device is
    checked before anything else): the data of the study's base config, loaded now (and kept:
    the trials reuse it). A dataset not on this machine, a validation split of no image, a
    subset larger than the training set: one DataError line, no trial made."""
    datasets.dataset_for(space.params_to_config(spec, space.fill_params(spec.space, {})))


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
        except StudyGone as exc:  # deleted under us: nothing of this trial may be written any more
            raise _Abandoned("gone", str(exc)) from exc
        except Exception as exc:
            outage = connection_problem(exc)
            if outage is not None:
                raise _Abandoned("outage", outage) from exc
            gone = _gone(trial.study)  # e.g. the trial's rows vanished with its deleted study
            if gone is not None:
                raise _Abandoned("gone", gone) from exc
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


@stop_on_signals()  # first of all: a signal while the worker prepares must stop it too
def run_worker(name: str, store: Store | str | None = None, *, device: str = "auto",
               worker_index: int | None = None, seed_offset: int | None = None,
               on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
               on_epoch=None, heartbeat_interval: int | None = None,
               grace_period: int | None = None, reconnect_for: float = RECONNECT_FOR,
               on_outage: Callable[[str, float], None] | None = None,
               data_dir: str | None = None, artifacts: CheckpointStore | str | None = None) -> WorkerResult:
    """Run trials of study `name` until its budget is reached or its timeout passes.

    Args:
        name: the study (created with `cnnsearch create`).
        store: the opened storage, or its URL (None -> $CNNSEARCH_STORAGE -> SQLite file here).
        device: this worker's training device.
        worker_index: this worker's index, added to the sampler's seed so that workers draw
            differently and a study can be replayed (`run` uses 0, `launch` 0..N-1). None claims
            the next index no worker of this study has used (`claim_worker_index`). The index and
            the sampler's seed are recorded with each trial (user attrs worker_index, sampler_seed).
        seed_offset: the former name of worker_index (used when worker_index is None).
        on_trial: called as on_trial(study, trial) after each trial of this worker.
        on_epoch: progress hook (trial number, epoch, metrics).
        heartbeat_interval, grace_period: override the storage defaults (seconds) when `store`
            is a URL; an opened Store keeps its own.
        reconnect_for: how long to keep retrying when the database goes away mid-run (seconds).
        on_outage: called as on_outage(reason, seconds waited so far) before each reconnect wait.
        data_dir: this machine's data directory (the worker's --data-dir); it, else
            $CNNSEARCH_DATA, overrides the stored spec's data.data_dir for this worker only
            (`spec.with_data_dir`); the stored spec is not changed.
        artifacts: where trial checkpoints go: an opened CheckpointStore, or a directory (None:
            $CNNSEARCH_ARTIFACTS, else `<db stem>-artifacts/` beside a SQLite file, else off;
            `search.artifacts.artifact_dir`). A retried trial resumes from its last checkpoint.

    Raises:
        KeyboardInterrupt: on SIGINT/SIGTERM, after the running trial is marked failed (stop
            reason "interrupted") and queued again once.
        StorageError: the database stayed unreachable for `reconnect_for` seconds.
        DataError: the study's data cannot be loaded here (checked before the first trial).
        TrialsCrashed: MAX_CRASHES_IN_A_ROW trials of this worker crashed in a row (an error in
            the objective, or in the sampler between ask and tell).
        StudyGone: the study was deleted (`delete --force`, `create --replace --force`) while
            this worker ran; checked before each trial and each write of one, so nothing of this
            worker reaches a new study that took its name (or, on SQLite, its ids).
    """
    resolve_device(device)  # a bad or absent device is one error now, not a crash in every trial
    kwargs = {k: v for k, v in (("heartbeat_interval", heartbeat_interval),
                                ("grace_period", grace_period)) if v}
    store = open_store(store, create=False, **kwargs)  # a worker never creates storage
    url = store.url
    study, spec = study_mod.load(name, store)
    spec = spec_mod.with_data_dir(spec, data_dir)  # the data is this machine's, not the study's
    _preflight(spec)
    if not isinstance(artifacts, CheckpointStore):
        artifacts = open_artifacts(url, artifacts, probe=True)  # unwritable: one line before the first trial
    watch_study(study)
    index = claim_worker_index(study, seed_offset if worker_index is None else worker_index)
    seed = sampler_seed(spec, index)
    study.sampler = spec_mod.make_sampler(spec, seed_offset=index)
    study.pruner = spec_mod.make_pruner(spec)
    share = cores.from_env() if resolve_device(device).type == "cpu" else None  # launch --cpus N
    objective = _guarded(make_objective(spec, device=device, on_epoch=_checking(on_epoch, share),
                                        trial_attrs={"worker_index": index, "sampler_seed": seed},
                                        checkpoints=artifacts))
    deadline = _deadline(study, spec.timeout)
    crashes: list[str] = []
    reconnect = Reconnect(url, reconnect_for)
    before = [started_trial(study), None]  # the last trial started before this step's ask; the last one told

    def current() -> int | None:
        """This step's trial: the objective's, or one that `ask` started and then failed in."""
        if objective.trial_id is not None:
            return objective.trial_id
        started = started_trial(study)
        return started if started != before[0] else None

    def counted(trial: optuna.trial.FrozenTrial | None, error: str | None) -> None:
        crashes[:] = crashes + [error] if error else []
        if trial is not None:
            before[1] = trial_id(trial)
            if on_trial:
                on_trial(study, trial)

    def after_trial(study_, trial):
        failed = trial.state == TrialState.FAIL and "error" in trial.user_attrs
        counted(trial, trial.user_attrs["error"] if failed else None)

    def crashed_outside(exc: Exception) -> None:
        """An error between ask and tell outside the objective: the sampler's before_trial (in
        `ask`) or after_trial (in `tell`). The trial's crash all the same: failed with its one
        line if still RUNNING, counted, shown; never a loop of failed trials."""
        number = current()
        if (_interrupted(exc) or isinstance(exc, StudyGone) or connection_problem(exc) is not None
                or number is not None and number == before[1] or _gone(study) is not None):
            raise exc  # a signal, the database, a deleted study; or on_trial's own error (a bug)
        if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
            return  # failed as stale by another worker while being told: taken over, not a crash
        error, storage, trial = first_line(exc, with_type=True), storage_of(study), None
        if number is not None:
            if storage.get_trial(number).state == TrialState.RUNNING:
                storage.set_trial_user_attr(number, "stop_reason", "crashed")
                storage.set_trial_user_attr(number, "error", error)
                storage.set_trial_state_values(number, state=TrialState.FAIL)
            trial = storage.get_trial(number)
        recorded = trial is not None and trial.user_attrs.get("error") == error
        logging.getLogger(OPTIMIZE_LOGGER).log(  # the CLI shows a recorded error in its trial line
            logging.INFO if recorded else logging.WARNING,
            f"Trial {trial.number if trial else '?'} crashed outside the objective: {error}")
        counted(trial, error)

    final_stage: list[bool] = []  # [True] once this worker works on the study's final stage

    def to_final_stage() -> None:
        """The search is over: go on with the child study of the final stage (finalstage.py)."""
        nonlocal study, objective
        child = finalstage.open_child(study, spec, study.user_attrs.get(UID_ATTR))
        unwatch_study(study)
        study = child
        watch_study(study)
        study.sampler = optuna.samplers.RandomSampler(seed=seed)  # every job's params are enqueued
        study.pruner = optuna.pruners.NopPruner()
        objective = _guarded(finalstage.make_job(spec, device=device, on_epoch=_checking(on_epoch, share),
                                                 checkpoints=artifacts))
        final_stage.append(True)

    def run_one() -> None:
        if share is not None:
            share.busy()
        try:
            study.optimize(objective, n_trials=1, timeout=None if final_stage else left, callbacks=[after_trial],
                           catch=(OverBudget, Exception))
        except Exception as exc:
            crashed_outside(exc)
        _check_signals()

    def wait() -> None:
        if share is not None:
            share.idle()  # nothing to train: the workers still training take this one's cores
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial -> retried, WAITING
        time.sleep(POLL_SECONDS)

    def step() -> WorkerResult | None:
        nonlocal left
        check_study(study)  # StudyGone: deleted or replaced since the last trial
        if len(crashes) >= MAX_CRASHES_IN_A_ROW:
            raise TrialsCrashed(f"{len(crashes)} trials crashed in a row, the last with {crashes[-1]}")
        if final_stage:
            what = finalstage.advance(study, spec, artifacts)
            if what == "done":
                return WorkerResult(run, "final stage done", index, seed)
            run_one() if what == "work" else wait()
            return None
        finished = count_trials(study, ("COMPLETE", "PRUNED"))
        left = None if deadline is None else deadline - time.monotonic()
        over = ("budget reached" if finished >= spec.n_trials
                else "timeout" if left is not None and left <= 0 else None)
        if over is not None:
            if spec.final is None:
                return WorkerResult(run, over, index, seed)
            if count_trials(study, ("RUNNING",)):  # the finalists are chosen from every finished trial
                wait()
                return None
            to_final_stage()
            return None
        claimable = count_trials(study, ("WAITING",))
        in_flight = count_trials(study, ("RUNNING",))
        if claimable or finished + in_flight < spec.n_trials:
            run_one()
        else:
            wait()
        return None

    run, left = 0, None
    listening = contextlib.ExitStack()  # SIGUSR1 from the other launched workers (search/cores.py)
    if share is not None:
        listening.enter_context(share.listening())
    try:
        while True:
            objective.trial_id, before[0] = None, started_trial(study)
            _check_signals()
            try:
                done = step()
            except _Abandoned as abandoned:
                if abandoned.kind == "interrupted":
                    raise KeyboardInterrupt(abandoned.reason) from None
                if abandoned.kind == "gone":
                    raise StudyGone(abandoned.reason) from None
                run += 1
                if abandoned.kind == "stale":  # another worker failed it and queued it again
                    continue
                reason = abandoned.reason
            except Exception as exc:
                if _interrupted(exc):  # Optuna turns a Ctrl-C during its tell into UnboundLocalError
                    raise KeyboardInterrupt("interrupted") from exc
                if isinstance(exc, StudyGone):
                    raise
                reason = connection_problem(exc)
                if reason is None:
                    gone = _gone(study)  # an error of a deleted study's rows, not a bug
                    if gone is not None:
                        raise StudyGone(gone) from None
                    raise
                run += objective.trial_id is not None
            else:
                reconnect.ok()
                if done is not None:
                    return done
                run += current() is not None
                continue
            while True:  # the database is gone: wait, then settle the trial it cut off
                if on_outage:
                    on_outage(mask_text(reason, url), reconnect.waited())
                reconnect.wait(reason)
                try:
                    _settle(study, current(), "storage outage")
                    break
                except Exception as exc:
                    reason = connection_problem(exc)
                    if reason is None:
                        raise
    except KeyboardInterrupt:
        for s in _HANDLED if _installed and _main_thread() else ():
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the clean-up short (restored on exit)
        with contextlib.suppress(Exception):  # database gone too: the heartbeat settles it later
            _settle(study, current(), "interrupted")
        raise
    finally:
        listening.close()  # and this worker's cores to the others
        unwatch_study(study)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
