"""Launched CPU workers share the machine's cores: the ones training take the waiting ones' threads
where that trains faster, and give them back at once when another starts training."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from search import cores
from search import spec as spec_mod
from search import study as study_mod
from search.launch import launch, plan_slots
from search.worker import run_worker
from studykit import tiny_study

LEARNS = '[[enqueue]]\nlr = 3e-3\noptimizer = "adam"\n'  # trains its 3 epochs, never stopped as diverged


@pytest.fixture
def threads_kept():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def other_worker():
    """A live process standing in for a second worker."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_job_grows_into_free_cores_only_where_that_trains_faster(tmp_path, threads_kept, other_worker, capsys):
    share = cores.CoreShare(tmp_path, 6, base=1)
    share.busy()
    assert torch.get_num_threads() == 1  # a job starts on launch's split
    share.epoch(100.0)
    assert torch.get_num_threads() == 6  # the only one training: every core, to be judged
    share.epoch(300.0)
    assert torch.get_num_threads() == 6  # 3x faster: kept
    (tmp_path / str(other_worker)).touch()  # a second worker trains
    (tmp_path / "999999999").touch()  # a killed worker's mark: not a live process, not counted
    (tmp_path / "notes.txt").write_text("not a mark")
    share.epoch(300.0)
    assert (share.busy_workers(), torch.get_num_threads()) == (2, 3)
    (tmp_path / str(other_worker)).unlink()  # it waits now
    share.epoch(290.0)
    assert torch.get_num_threads() == 6
    capsys.readouterr()
    share.epoch(300.0)  # not GAIN times faster than 290 on 3: the cores are not free
    assert torch.get_num_threads() == 3
    assert "cores: 3 torch thread(s) (6 trained 300 samples/s against 290 on 3" in capsys.readouterr().err
    share.epoch(300.0)
    assert torch.get_num_threads() == 3  # for the rest of this job
    share.busy()  # the next job tries again, from launch's split
    assert torch.get_num_threads() == 1
    share.epoch(None)  # no rate to judge a growth by: no growth
    assert torch.get_num_threads() == 1
    share.idle()
    assert not share.mark.exists()


def test_more_busy_workers_than_cores_get_a_thread_each(tmp_path, threads_kept, other_worker):
    (tmp_path / str(other_worker)).touch()
    share = cores.CoreShare(tmp_path, 1, base=1, verbose=False)
    share.busy()
    share.epoch(100.0)
    assert torch.get_num_threads() == 1


def test_another_worker_starting_to_train_shrinks_the_threads_at_once(tmp_path, threads_kept, other_worker,
                                                                      capsys):
    share = cores.CoreShare(tmp_path, 6, base=6)
    with share.listening():
        share.busy()
        assert torch.get_num_threads() == 6
        capsys.readouterr()
        (tmp_path / str(other_worker)).touch()  # what the other one's busy() does, then its nudge:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert torch.get_num_threads() == 3  # in the handler, before this worker's next epoch
        assert capsys.readouterr().err == ""  # said at the next epoch's end, never inside the handler
        share.epoch(100.0)
        assert "cores: 3 torch thread(s) (2 worker(s) of this machine" in capsys.readouterr().err
    assert not share.mark.exists()  # leaving: this worker's cores go to the others
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_busy_and_idle_nudge_the_other_busy_workers(tmp_path, threads_kept):
    got = tmp_path / "got"
    code = (f"import signal, time, pathlib\n"
            f"signal.signal(signal.SIGUSR1, lambda s, f: pathlib.Path({str(got)!r}).open('a').write('x'))\n"
            f"print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        share = cores.CoreShare(tmp_path / "share", 2, base=1, verbose=False)
        share.folder.mkdir()
        (share.folder / str(proc.pid)).touch()
        for doing, expected in ((share.busy, "x"), (share.idle, "xx")):  # one at a time: signals coalesce
            doing()
            deadline = time.monotonic() + 10
            while (not got.exists() or got.read_text() != expected) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert got.exists() and got.read_text() == expected, doing
        share.idle()  # again, as a waiting worker polls: the others know already
        time.sleep(0.3)
        assert got.read_text() == "xx"
    finally:
        proc.kill()
        proc.wait()


def test_a_share_only_where_launch_made_one(tmp_path, monkeypatch):
    monkeypatch.delenv(cores.DIR_ENV, raising=False)
    monkeypatch.setenv(cores.CORES_ENV, "4")
    assert cores.from_env() is None
    for folder, count in ((tmp_path / "gone", "4"), (tmp_path, "four"), (tmp_path, "")):
        monkeypatch.setenv(cores.DIR_ENV, str(folder))
        monkeypatch.setenv(cores.CORES_ENV, count)
        assert cores.from_env() is None, (folder, count)
    monkeypatch.setenv(cores.CORES_ENV, "4")
    monkeypatch.setenv("CNNSEARCH_THREADS", "2")
    share = cores.from_env()
    assert (share.cores, share.base) == (4, 2)


@pytest.mark.parametrize("gain, expected", [(0.0, [1, 6, 6]), (1e9, [1, 6, 1])])
def test_a_worker_takes_a_waiting_ones_cores_after_an_epoch_and_keeps_them_if_they_pay(
        tmp_path, monkeypatch, threads_kept, other_worker, gain, expected):
    folder = tmp_path / "share"
    folder.mkdir()
    (folder / str(other_worker)).touch()
    monkeypatch.setenv(cores.DIR_ENV, str(folder))
    monkeypatch.setenv(cores.CORES_ENV, "6")
    monkeypatch.setenv("CNNSEARCH_THREADS", "1")
    monkeypatch.setattr(cores, "GAIN", gain)  # what an epoch on more threads must gain to keep them
    torch.set_num_threads(1)
    url = f"sqlite:///{tmp_path}/share.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=1, epochs=3, enqueue=LEARNS)), url)
    threads = []

    def on_epoch(number, epoch, metrics):
        threads.append(torch.get_num_threads())
        if epoch == 0:  # the other worker goes to wait: its cores are this one's from the next epoch
            (folder / str(other_worker)).unlink()

    run_worker("tiny", url, device="cpu", on_epoch=on_epoch)
    assert threads == expected  # 6 cores, 2 workers busy, then 1: kept, or given back as not faster
    assert not (folder / str(os.getpid())).exists()  # done: its cores are the others'
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_launch_gives_cpu_workers_a_share_and_removes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    url = f"sqlite:///{tmp_path}/launched.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=2, epochs=1)), url)
    seen = []

    def read_env(k, slot, pid):
        # as for cmdline in test_launch: under load the new environment can be empty for a moment
        deadline, env = time.monotonic() + 10, {}
        while "CNNSEARCH_STORAGE" not in env and time.monotonic() < deadline:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)
            time.sleep(0.001)
        with open(f"/proc/{pid}/status") as f:
            ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
        seen.append((env.get(cores.DIR_ENV), env.get(cores.CORES_ENV), bool(ignored >> (signal.SIGUSR1 - 1) & 1)))

    assert launch("tiny", url, plan_slots(None, 1, 2, tmp_path / "logs"), on_start=read_env) == [0, 0]
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0][1] == str(os.cpu_count())
    assert seen[0][2], "a worker must start with SIGUSR1 ignored: one sent before it listens would kill it"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # launch's own, as it was
    assert seen[0][0].startswith(str(tmp_path / "tmp"))
    assert list((tmp_path / "tmp").iterdir()) == []  # the share's folder went with the launch
