"""The cores of one machine shared by the CPU workers `cnnsearch launch --cpus N` started.

Each worker starts with cores // N torch threads. A worker that has nothing to train (the budget
is spent and the last trials run elsewhere; in the final stage, the seed runs that follow the
finalists) waits and leaves its cores idle, so the workers still training take them over. In a
folder launch made, a file named by a worker's pid marks it busy: launch writes it when the
worker starts, the worker removes it when it waits and writes it again when it trains. After
every epoch a training worker sets its threads to cores // (live busy workers): between epochs,
in the main thread, where torch.set_num_threads applies to the next op. A worker gives cores
back the same way, at its next epoch's end. Without launch ($CNNSEARCH_CORES_DIR unset) nothing
changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DIR_ENV, CORES_ENV = "CNNSEARCH_CORES_DIR", "CNNSEARCH_CORES"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class CoreShare:
    def __init__(self, folder: str | Path, cores: int, *, verbose: bool = True):
        self.folder, self.cores, self.verbose = Path(folder), max(1, cores), verbose
        self.mark = self.folder / str(os.getpid())

    def busy(self) -> None:
        """This worker trains from now on: counted by every worker's next `adjust`."""
        self.mark.touch()
        self.adjust()

    def idle(self) -> None:
        self.mark.unlink(missing_ok=True)

    def busy_workers(self) -> int:
        """Live workers marked busy (a killed worker's mark is skipped), this one at least."""
        pids = [int(p.name) for p in self.folder.iterdir() if p.name.isdigit()]
        return max(1, sum(1 for pid in pids if pid == os.getpid() or _alive(pid)))

    def adjust(self) -> None:
        """Take this worker's share of the cores now: cores // busy workers torch threads."""
        import torch

        try:
            busy = self.busy_workers()
        except OSError:  # the folder is gone (launch ended): keep the threads as they are
            return
        want = max(1, self.cores // busy)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            if self.verbose:
                print(f"cores: {want} torch thread(s), {busy} worker(s) of this machine training on "
                      f"{self.cores} cores", file=sys.stderr, flush=True)


def from_env() -> CoreShare | None:
    """The share launch set up for this worker ($CNNSEARCH_CORES_DIR, $CNNSEARCH_CORES), or None."""
    folder, cores = os.environ.get(DIR_ENV), os.environ.get(CORES_ENV, "")
    if not folder or not cores.isdigit() or not Path(folder).is_dir():
        return None
    return CoreShare(folder, int(cores))
