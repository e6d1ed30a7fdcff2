"""The cores of one machine shared by the CPU workers `cnnsearch launch --cpus N` started.

Each worker starts with cores // N torch threads. A worker that has nothing to train (the budget
is spent and the last trials run elsewhere; in the final stage, the seed runs that follow the
finalists) waits and leaves its cores idle, so the workers still training take them over. In a
folder launch made, a file named by a worker's pid marks it busy: launch writes it when the
worker starts and removes it when the worker exits; the worker removes it when it waits and
writes it again when it starts a job (a trial, a final run), on launch's split of the cores.

After each epoch a training worker takes cores // (live busy workers) torch threads, and keeps
more than it had only if the next epoch trains at least GAIN times faster: on a machine where
something else uses the cores, OpenMP's extra threads spin and wait (measured here: a 2-thread
run beside a busy process on 2 cores trained 7-25x slower than on 1 thread), so they are given
back for the rest of the job. A worker that starts or stops a job tells the others at once
(SIGUSR1): those holding more than their share shrink in the handler, between ops, so two
workers never hold one core's threads for long. torch.set_num_threads runs in the main thread.
Without launch ($CNNSEARCH_CORES_DIR unset) nothing changes.
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


GAIN = 1.15  # more threads stay only where an epoch on them trains this much faster than before


class CoreShare:
    def __init__(self, folder: str | Path, cores: int, *, base: int | None = None, verbose: bool = True):
        import torch

        self.folder, self.cores, self.verbose = Path(folder), max(1, cores), verbose
        self.base = base or torch.get_num_threads()  # launch's split, cores // workers: where each job starts
        self.mark = self.folder / str(os.getpid())
        self.news: str | None = None  # a change made in the signal handler, said at the next epoch's end
        self.before: tuple[int, float] | None = None  # the last epoch's threads and samples/s
        self.trying: tuple[int, float] | None = None  # the same before a growth, until an epoch judges it
        self.cap: int | None = None  # this job's most threads: more did not pay

    def busy(self) -> None:
        """This worker starts a job (a trial, a final run) on launch's split of the cores; the
        others shrink to their share now, and it grows into free cores after its first epoch."""
        news = not self.mark.exists()  # else the others count it already
        self.mark.touch()
        self.before = self.trying = self.cap = None
        self._set(min(self.base, self._share()), say=True, why="a job starts on launch's split, and grows after an "
                                                              "epoch where cores are free")
        if news:
            self._nudge()

    def idle(self) -> None:
        """This worker waits (or stops): the others training grow into its cores after their epoch."""
        if self.mark.exists():  # a waiting worker polls: tell the others once
            self.mark.unlink(missing_ok=True)
            self._nudge()

    def epoch(self, samples_per_s: float | None) -> None:
        """After each epoch of this worker's job: more threads that did not train at least GAIN
        times faster than the epoch before them are given back for the rest of the job (the
        cores were not free: a contended OpenMP thread spins); then take the share."""
        import torch

        threads = torch.get_num_threads()
        if self.trying is not None and samples_per_s is not None:
            fewer, rate = self.trying
            self.trying = None
            if samples_per_s < GAIN * rate:
                self.cap, self.before = fewer, None
                self._set(fewer, say=True, why=f"{threads} trained {samples_per_s:.0f} samples/s against "
                                                f"{rate:.0f} on {fewer}: the cores are not free")
                return
        self.before = (threads, samples_per_s) if samples_per_s else None
        want = self._share()
        if want > threads and self.before is None:
            want = threads  # grow only where an epoch before it can judge the growth
        if want > threads:
            self.trying = self.before
        self._set(want, say=True)

    def _share(self) -> int:
        """cores // live busy workers, at most this job's cap; the current threads if unknown."""
        import torch

        try:
            want = max(1, self.cores // self.busy_workers())
        except OSError:  # the folder is gone (launch ended): keep the threads as they are
            return torch.get_num_threads()
        return min(want, self.cap) if self.cap else want

    def _set(self, threads: int, say: bool, why: str = "") -> None:
        import torch

        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            if not why:
                with contextlib.suppress(OSError):
                    why = f"{self.busy_workers()} worker(s) of this machine training on {self.cores} cores"
            self.news = f"cores: {threads} torch thread(s)" + (f" ({why})" if why else "")
        if say and self.news is not None:
            if self.verbose:
                print(self.news, file=sys.stderr, flush=True)
            self.news = None

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

    def _on_signal(self, signum, frame) -> None:
        """Another worker started or stopped a job: shrink to the share now (growing waits for
        this worker's epoch end, where it can be judged). No print: the main thread may be inside
        a write to the same stream."""
        import torch

        with contextlib.suppress(Exception):  # nothing may reach the training it interrupted
            if self._share() < torch.get_num_threads():
                self.trying = None  # this epoch ran on two counts: it judges nothing
                self._set(self._share(), say=False)

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
    base = os.environ.get("CNNSEARCH_THREADS", "")  # launch's split (torch's own count if unset)
    return CoreShare(folder, int(cores), base=int(base) if base.isdigit() else None)
