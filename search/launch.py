"""Many workers on one machine: plan one slot per GPU (or share the CPU cores), start a
`cnnsearch worker` process per slot, forward Ctrl-C/SIGTERM to all of them and wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from search import cores
from search.errors import LaunchError
from search.urls import storage_url

# The `cnnsearch` program in a new process, started as its console script starts it. Not
# `python -m search.cli`: a Ctrl-C during `-m`'s import of the module exits 1 with a traceback,
# where a script's start-up ends as killed by SIGINT (130), as every later stop does.
CNNSEARCH = [sys.executable, "-c", "import sys; sys.argv[0] = 'cnnsearch'; from search.cli import app; sys.exit(app())"]


def visible_gpus(gpus: str) -> list[str]:
    """`all` -> every CUDA device index; `0,2` -> those. Raises LaunchError on a bad list."""
    if gpus == "all":
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise LaunchError(f"--gpus: expected 'all' or a list like 0,1, got {gpus!r}")
    return ids


@dataclass(frozen=True)
class Slot:
    device: str
    env: dict
    log: Path


def plan_slots(gpus: str | None, per_gpu: int, cpus: int | None, log_dir: Path) -> list[Slot]:
    """One worker per GPU slot (CUDA_VISIBLE_DEVICES), or `cpus` CPU workers sharing the cores
    with torch threads split between them so the machine is never oversubscribed (and, while
    some wait with nothing to train, split between the ones training: search/cores.py)."""
    ids = visible_gpus(gpus) if gpus else []
    if gpus and not ids:
        raise LaunchError("--gpus all: no CUDA device found on this machine; use --cpus N")
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
    # CPU workers mark themselves busy here, so the ones training take the idle ones' cores
    share = tempfile.TemporaryDirectory(prefix="cnnsearch-cores-") if any(s.device == "cpu" for s in slots) else None
    shared = {cores.DIR_ENV: share.name, cores.CORES_ENV: str(os.cpu_count() or 1)} if share else {}
    # each worker starts with SIGUSR1 ignored (inherited through exec) until it listens for the
    # others' "I train / I wait" (search/cores.py): one sent earlier would otherwise kill it
    usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN) if share is not None else None
    try:
        for k, slot in enumerate(slots):
            slot.log.parent.mkdir(parents=True, exist_ok=True)
            # The URL goes in the environment, not argv: `ps` shows every user a command line.
            cmd = [*CNNSEARCH, "worker", name,
                   "--device", slot.device, "--quiet", "--worker-index", str(k), *worker_args]
            log = open(slot.log, "ab")
            env = {**os.environ, **slot.env, "CNNSEARCH_STORAGE": url, **(shared if slot.device == "cpu" else {})}
            procs.append(subprocess.Popen(cmd, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
            if share is not None and slot.device == "cpu":
                (Path(share.name) / str(procs[-1].pid)).touch()  # busy until it waits (search/cores.py)
            if on_start:
                on_start(k, slot, procs[-1].pid)
    finally:
        if usr1 is not None:
            signal.signal(signal.SIGUSR1, usr1)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.2)
            for p in procs:  # an exited worker is not busy, and its pid may be reused
                if share is not None and p.returncode is not None:
                    (Path(share.name) / str(p.pid)).unlink(missing_ok=True)
        return [p.returncode for p in procs]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if share is not None:
            share.cleanup()
