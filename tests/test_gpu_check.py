"""scripts/gpu_check.sh on a machine without CUDA, and the configuration of its CIFAR part."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_model, count_parameters
from search import config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PROBE_LOG = ROOT / "docs" / "runs" / "2026-12-03-cifar_probe.log"


def _run(parts: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_PARTS": parts, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("GPU_CHECK_DEVICE", None)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_the_cifar_config_is_the_one_the_cifar_study_chose():
    """gpu_check_cifar.toml says it is trial 1 of the CIFAR probe: the params its log prints."""
    cfg = config.load(ROOT / "scripts" / "gpu_check_cifar.toml")
    line = next(x for x in PROBE_LOG.read_text().splitlines() if x.strip().startswith("params:"))
    logged = dict(kv.split("=", 1) for kv in line.split("params:", 1)[1].strip().split(", "))
    mp = cfg.model_params
    assert [float(logged[f"dropout_{i}"]) for i in (1, 2, 3)] == mp["dropout"]
    assert float(logged["fc_dropout"]) == mp["fc_dropout"]
    assert logged["batchnorm"] == str(mp["batchnorm"]) and float(logged["width"]) == mp["width"]
    for key in ("optimizer", "scheduler"):
        assert logged[key] == getattr(cfg, key)
    for key in ("lr", "weight_decay", "erasing", "label_smoothing"):
        assert float(logged[key]) == getattr(cfg, key)
    for key in ("crop_padding", "batch_size"):
        assert int(logged[key]) == getattr(cfg, key)
    assert logged["flip"] == str(cfg.flip)
    with torch.device("meta"):
        model = build_model(cfg, (3, 32, 32), 10)
    assert count_parameters(model) == 2_198_602  # the probe's finalist: "width 2 (2,198,602 params)"


def test_an_unknown_part_is_one_line_and_exit_2():
    for parts in ("bogus", "tests cifarr"):
        res = _run(parts)
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            f"GPU_CHECK_PARTS: unknown part '{parts.split()[-1]}' (parts: tests engine resume launch cifar)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_the_cifar_part_alone_skips_without_cuda_and_says_why():
    res = _run("cifar")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = res.stdout.split("==== summary", 1)[1]
    assert re.search(r"^cifar final training: skipped, no CUDA device", summary, re.M)
    for part in ("tests", "engine", "resume", "launch"):
        assert f"skipped: {part} is not in GPU_CHECK_PARTS" in res.stdout
    assert "launch 3 vs 1" not in summary  # a part not asked for leaves no line
