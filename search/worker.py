"""Workers: pull trials from the shared study until its global budget or timeout; launch many.

A worker exits only when the study has its budget of finished (complete + pruned) trials, or
its timeout has passed. While the remaining slots are held by other workers' running trials it
waits and keeps failing stale ones (their worker died), so a dead worker's trial is retried
by a live one instead of being lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import optuna

from search import spec as spec_mod
from search import study as study_mod
from search.objective import OverBudget, make_objective
from search.storage import count_trials, storage_url

POLL_SECONDS = 2.0
MAX_CRASHES_IN_A_ROW = 5  # a space where every trial crashes is a bug to fix, not to loop on


@dataclass
class WorkerResult:
    trials_run: int
    stopped_because: str  # "budget reached" | "timeout" | "N crashes in a row: <error>"


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


def _raise_interrupt(signum, frame):  # SIGTERM from a scheduler behaves like Ctrl-C
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_worker(name: str, url: str | None = None, *, device: str = "auto", seed_offset: int | None = None,
               on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
               on_epoch=None, heartbeat_interval: int | None = None,
               grace_period: int | None = None) -> WorkerResult:
    """Run trials of study `name` until its budget is reached or its timeout passes.

    Args:
        name: the study (created with `cnnsearch create`).
        url: storage URL (None -> $CNNSEARCH_STORAGE -> SQLite file here).
        device: this worker's training device.
        seed_offset: added to the sampler's seed so workers explore differently (default: pid).
        on_trial: called as on_trial(study, trial) after each trial of this worker.
        on_epoch: progress hook (trial number, epoch, metrics).
        heartbeat_interval, grace_period: override the storage defaults (seconds).

    Raises:
        KeyboardInterrupt: on SIGINT/SIGTERM, after the running trial is marked failed.
    """
    kwargs = {k: v for k, v in (("heartbeat_interval", heartbeat_interval),
                                ("grace_period", grace_period)) if v}
    study, spec = study_mod.load(name, url, **kwargs)
    offset = os.getpid() if seed_offset is None else seed_offset
    study.sampler = spec_mod.make_sampler(spec, seed_offset=offset)
    study.pruner = spec_mod.make_pruner(spec)
    objective = make_objective(spec, device=device, on_epoch=on_epoch)
    deadline = _deadline(study, spec.timeout)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    crashes: list[str] = []

    def after_trial(study_, trial):
        failed = trial.state == optuna.trial.TrialState.FAIL and "error" in trial.user_attrs
        crashes[:] = crashes + [trial.user_attrs["error"]] if failed else []
        if on_trial:
            on_trial(study_, trial)

    run = 0
    try:
        while True:
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
                run += 1
            else:
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial -> retried, WAITING
                time.sleep(POLL_SECONDS)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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


def launch(name: str, url: str | None, slots: list[Slot], *,
           on_start: Callable[[int, Slot, int], None] | None = None) -> list[int]:
    """Start one `cnnsearch worker` process per slot and wait; Ctrl-C/SIGTERM reach every worker.

    Returns the workers' exit codes.
    """
    url = storage_url(url)
    procs = []
    for k, slot in enumerate(slots):
        slot.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "search.cli", "worker", name, "--storage", url,
               "--device", slot.device, "--quiet", "--seed-offset", str(k)]
        log = open(slot.log, "ab")
        procs.append(subprocess.Popen(cmd, env={**os.environ, **slot.env}, stdout=log,
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


