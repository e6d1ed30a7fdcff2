"""Planning worker slots (GPUs, CPU cores) and launching worker processes on one machine."""

import time

import optuna
import pytest
import torch

from search import spec as spec_mod
from search import study as study_mod
from search.errors import LaunchError
from search.launch import launch, plan_slots, visible_gpus
from search.storage import open_storage
from studykit import tiny_study


def test_cpu_slots_split_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    slots = plan_slots(None, 1, 4, tmp_path)
    assert [s.env["OMP_NUM_THREADS"] for s in slots] == ["2"] * 4
    assert len({s.log for s in slots}) == 4 and all(s.device == "cpu" for s in slots)
    with pytest.raises(LaunchError, match="--gpus"):
        visible_gpus("zero,one")


def test_launch_keeps_the_storage_url_off_the_workers_command_lines(tmp_path):
    """`ps` shows every user each process's argv; a PostgreSQL URL there would show its password."""
    url = f"sqlite:///{tmp_path}/launched.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=2, epochs=1)), url)
    argv = []

    def read_argv(k, slot, pid):  # Popen returns after the exec, so this is the worker's own argv
        # ... but the kernel closes the exec-status pipe before it copies the new argv, so under
        # load cmdline can still be empty for a moment: wait for it.
        deadline = time.monotonic() + 10
        while True:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
            if raw or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        argv.append(raw.decode().split("\0"))

    codes = launch("tiny", url, plan_slots(None, 1, 2, tmp_path / "logs"), on_start=read_argv)
    assert codes == [0, 0]
    assert len(argv) == 2 and all("worker" in a and not any("launched.db" in part for part in a) for a in argv), argv
    study = optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat_interval=None))
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) == 2
    for k, args in enumerate(argv):  # worker k is worker index k: recorded with the study and its trials
        assert args[args.index("--worker-index") + 1] == str(k), args
    assert {"worker_index:0", "worker_index:1"} <= set(study.user_attrs)
    assert {t.user_attrs["worker_index"] for t in study.trials} <= {0, 1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_launch_runs_two_workers_on_one_gpu(tmp_path):
    url = f"sqlite:///{tmp_path}/gpu.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=20, epochs=4)), url)
    slots = plan_slots("0", 2, None, tmp_path / "logs")
    assert [(s.device, s.env["CUDA_VISIBLE_DEVICES"]) for s in slots] == [("cuda:0", "0")] * 2
    assert launch("tiny", url, slots) == [0, 0]
    study = optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat_interval=None))
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 20
    assert {t.user_attrs["device"] for t in finished} == {"cuda:0"}
    assert len({t.user_attrs["pid"] for t in finished}) == 2  # both workers trained on the one GPU
    assert {t.user_attrs["precision"] for t in finished} == {"bf16" if torch.cuda.is_bf16_supported() else "fp32"}


def test_gpus_all_without_a_gpu_is_a_launch_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(LaunchError, match="no CUDA device"):
        plan_slots("all", 1, None, tmp_path)
