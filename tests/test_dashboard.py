"""`cnnsearch dashboard`, rendered by a real headless Chromium against a small finished study.

Set CNNSEARCH_UPDATE_SCREENSHOTS=1 to write the study page's screenshot to docs/dashboard.png.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from search import spec as spec_mod
from search import study as study_mod
from search.cli import app

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")

STUDY = """
[study]
name = "dash_demo"
n_trials = 4
description = "Dashboard demo: pooling and learning rate on synthetic 8x8 images"

[data]
dataset = "synthetic"

[space.lr]
type = "float"
low = 1e-4
high = 1e-1
log = true

[space.pool]
type = "categorical"
choices = ["max", "avg"]
"""


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """A study created by cnnsearch (spec, note) with trials added directly through optuna."""
    folder = tmp_path_factory.mktemp("dashboard")
    (folder / "demo.toml").write_text(STUDY)
    url = f"sqlite:///{folder / 'study.db'}"
    study = study_mod.create(spec_mod.load_spec(folder / "demo.toml"), url).study
    dists = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "pool": CategoricalDistribution(["max", "avg"])}
    for number, (lr, pool, curve, state) in enumerate([
            (3e-3, "max", [0.81, 0.90, 0.94], TrialState.COMPLETE),
            (1e-2, "avg", [0.78, 0.88, 0.91], TrialState.COMPLETE),
            (1e-1, "max", [0.12], TrialState.PRUNED),
            (5e-4, "avg", [0.70, 0.83, 0.89], TrialState.COMPLETE)]):
        study.add_trial(create_trial(
            state=state, value=max(curve) if state == TrialState.COMPLETE else None,
            params={"lr": lr, "pool": pool}, distributions=dists,
            intermediate_values=dict(enumerate(curve)),
            user_attrs={"host": "gpu-node-7", "device": "cuda:0", "n_params": 22_410 + number,
                        "epoch_seconds": [1.5] * len(curve),
                        "stop_reason": "finished" if state == TrialState.COMPLETE else "pruned after epoch 0"}))
    return url, study._study_id


@pytest.fixture(scope="module")
def dashboard(storage):
    """`cnnsearch dashboard --port 0` in a subprocess; yields the address it printed."""
    url, _ = storage
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "dashboard", "--storage", url, "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = _first_line(proc.stdout, timeout=120)
        assert "127.0.0.1" in line and "dashboard" in line, line
        yield line.split(" at ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _first_line(stream, timeout: float) -> str:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert got and got[0], "the dashboard printed nothing"
    return got[0]


def chromium(*args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_chromium
def test_study_page_shows_the_study_its_note_and_a_screenshot(dashboard, storage, tmp_path):
    _, study_id = storage
    dom = chromium("--dump-dom", f"{dashboard}/studies/{study_id}/note")
    assert "dash_demo" in dom  # the study name in the header, on every page
    assert "Dashboard demo: pooling and learning rate" in dom and "writes the best config" in dom  # the note
    shot = REPO / "docs" / "dashboard.png" if os.environ.get("CNNSEARCH_UPDATE_SCREENSHOTS") else tmp_path / "d.png"
    shot.parent.mkdir(exist_ok=True)
    chromium("--window-size=1400,2400", "--hide-scrollbars", f"--screenshot={shot}", f"{dashboard}/studies/{study_id}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_chromium
def test_trial_list_shows_user_attributes(dashboard, storage):
    _, study_id = storage
    dom = chromium("--dump-dom", f"{dashboard}/studies/{study_id}/trials")
    for text in ("Trial 3", "n_params", "stop_reason", "gpu-node-7", "22410"):  # the list, then trial 0
        assert text in dom, text


def test_a_busy_port_is_one_line(tmp_path):
    from search.storage import open_storage

    url = f"sqlite:///{tmp_path / 'd.db'}"
    open_storage(url, heartbeat_interval=None)  # the tables: the dashboard, a reader, creates none
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = CliRunner().invoke(app, ["dashboard", "--storage", url, "--port",
                                          str(busy.getsockname()[1])])
    assert result.exit_code == 1 and result.stderr.startswith("error: cannot listen on 127.0.0.1:"), result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_listening_beyond_loopback_warns(storage):
    url, _ = storage
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "dashboard", "--storage", url, "--host", "0.0.0.0",
                             "--port", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert _first_line(proc.stderr, timeout=120).startswith("warning: listening on 0.0.0.0")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
