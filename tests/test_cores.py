"""Launched CPU workers share the machine's cores: the ones training take the waiting ones' threads."""

import os
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


def test_busy_workers_split_the_cores(tmp_path, threads_kept, other_worker):
    share = cores.CoreShare(tmp_path, 6, verbose=False)
    share.busy()
    assert torch.get_num_threads() == 6  # the only one training: every core
    (tmp_path / str(other_worker)).touch()
    share.adjust()
    assert (share.busy_workers(), torch.get_num_threads()) == (2, 3)
    (tmp_path / "999999999").touch()  # a killed worker's mark: not a live process, not counted
    (tmp_path / "notes.txt").write_text("not a mark")
    share.adjust()
    assert torch.get_num_threads() == 3
    (tmp_path / str(other_worker)).unlink()  # the other one waits now
    share.adjust()
    assert torch.get_num_threads() == 6
    share.idle()
    assert not share.mark.exists()


def test_more_busy_workers_than_cores_get_a_thread_each(tmp_path, threads_kept, other_worker):
    (tmp_path / str(other_worker)).touch()
    cores.CoreShare(tmp_path, 1, verbose=False).busy()
    assert torch.get_num_threads() == 1


def test_a_share_only_where_launch_made_one(tmp_path, monkeypatch):
    monkeypatch.delenv(cores.DIR_ENV, raising=False)
    monkeypatch.setenv(cores.CORES_ENV, "4")
    assert cores.from_env() is None
    for folder, count in ((tmp_path / "gone", "4"), (tmp_path, "four"), (tmp_path, "")):
        monkeypatch.setenv(cores.DIR_ENV, str(folder))
        monkeypatch.setenv(cores.CORES_ENV, count)
        assert cores.from_env() is None, (folder, count)
    monkeypatch.setenv(cores.CORES_ENV, "4")
    assert cores.from_env().cores == 4


def test_a_worker_training_beside_a_busy_one_takes_its_share_after_each_epoch(tmp_path, monkeypatch,
                                                                                threads_kept, other_worker):
    folder = tmp_path / "share"
    folder.mkdir()
    (folder / str(other_worker)).touch()
    monkeypatch.setenv(cores.DIR_ENV, str(folder))
    monkeypatch.setenv(cores.CORES_ENV, "6")
    torch.set_num_threads(1)
    url = f"sqlite:///{tmp_path}/share.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=1, epochs=3, enqueue=LEARNS)), url)
    threads = []

    def on_epoch(number, epoch, metrics):
        threads.append(torch.get_num_threads())
        if epoch == 0:  # the other worker goes to wait: its cores are this one's from the next epoch
            (folder / str(other_worker)).unlink()

    run_worker("tiny", url, device="cpu", on_epoch=on_epoch)
    assert threads == [3, 6, 6]  # 6 cores: 2 workers busy, then 1
    assert (folder / str(os.getpid())).exists()


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
        seen.append((env.get(cores.DIR_ENV), env.get(cores.CORES_ENV)))

    assert launch("tiny", url, plan_slots(None, 1, 2, tmp_path / "logs"), on_start=read_env) == [0, 0]
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0][1] == str(os.cpu_count())
    assert seen[0][0].startswith(str(tmp_path / "tmp"))
    assert list((tmp_path / "tmp").iterdir()) == []  # the share's folder went with the launch
