"""The cores of one machine shared by the CPU workers `cnnsearch launch --cpus N` started.

Each worker starts with cores // N torch threads. A worker that has nothing to train (the budget
is spent and the last trials run elsewhere; in the final stage, the seed runs that follow the
finalists) waits and leaves its cores idle, so the workers still training take them over. In a
folder launch made, a file named by a worker's pid marks it busy: launch writes it when the
worker starts and removes it when the worker exits; the worker removes it when it waits and
writes it again when it trains. A training worker sets its threads to cores // (live busy
workers) after every epoch, and at once when another worker starts or stops training: that one
sends it SIGUSR1, so two workers never hold one core's threads for long (a contended OpenMP
thread spins: measured here, a 2-thread run beside two busy processes on 2 cores trained 7x
slower than on 1 thread). torch.set_num_threads runs in the main thread, between ops. Without
launch ($CNNSEARCH_CORES_DIR unset) nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
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
        self.news: str | None = None  # a change made in the signal handler, said at the next `adjust`

    def busy(self) -> None:
        """This worker trains from now on: it takes its share, the others shrink to theirs now."""
        news = not self.mark.exists()  # else the others count it already
        self.mark.touch()
        self.adjust()
        if news:
            self._nudge()

    def idle(self) -> None:
        """This worker waits (or stops): the others training grow into its cores now."""
        if self.mark.exists():  # a waiting worker polls: tell the others once
            self.mark.unlink(missing_ok=True)
            self._nudge()

    def _marked(self) -> list[int]:
        return [int(p.name) for p in self.folder.iterdir() if p.name.isdigit()]

    def busy_workers(self) -> int:
        """Live workers marked busy (a killed worker's mark is skipped), this one at least."""
        return max(1, sum(1 for pid in self._marked() if pid == os.getpid() or _alive(pid)))

    def _nudge(self) -> None:
        with contextlib.suppress(OSError):  # the folder gone (launch ended), a worker just exited
            for pid in self._marked():
                if pid != os.getpid():
                    os.kill(pid, signal.SIGUSR1)

    def adjust(self, say: bool = True) -> None:
        """Take this worker's share of the cores now: cores // busy workers torch threads."""
        import torch

        try:
            busy = self.busy_workers()
        except OSError:  # the folder is gone (launch ended): keep the threads as they are
            return
        want = max(1, self.cores // busy)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            self.news = (f"cores: {want} torch thread(s), {busy} worker(s) of this machine training "
                         f"on {self.cores} cores")
        if say and self.news is not None:
            if self.verbose:
                print(self.news, file=sys.stderr, flush=True)
            self.news = None

    def _on_signal(self, signum, frame) -> None:
        # no print here: the main thread may be inside a write to the same stream
        with contextlib.suppress(Exception):  # nothing may reach the training it interrupted
            self.adjust(say=False)

    @contextlib.contextmanager
    def listening(self):
        """While inside, SIGUSR1 (another worker started or stopped training) adjusts at once.
        launch starts its workers with SIGUSR1 ignored, so one sent before this is harmless."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGUSR1, self._on_signal)
        try:
            yield
        finally:
            signal.signal(signal.SIGUSR1, previous)
            self.idle()


def from_env() -> CoreShare | None:
    """The share launch set up for this worker ($CNNSEARCH_CORES_DIR, $CNNSEARCH_CORES), or None."""
    folder, cores = os.environ.get(DIR_ENV), os.environ.get(CORES_ENV, "")
    if not folder or not cores.isdigit() or not Path(folder).is_dir():
        return None
    return CoreShare(folder, int(cores))
