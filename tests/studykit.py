"""Small study files and a scratch PostgreSQL database for the search tests."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from search.launch import CNNSEARCH

PG_ADMIN_ENV = "CNNSEARCH_TEST_PG"


def tiny_study(tmp_path: Path, name: str = "tiny", n_trials: int = 6, epochs: int = 3,
               pruner: str = 'name = "MedianPruner"\nkwargs = { n_startup_trials = 2, n_warmup_steps = 0 }',
               enqueue: str = "", extra_study: str = "") -> Path:
    """A study on 12x12 synthetic images that trains a trial in about a second on CPU."""
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[study]
name = "{name}"
n_trials = {n_trials}
{extra_study}

[data]
dataset = "synthetic"
data_options = {{ n = 400, classes = 4, channels = 1, size = 12, seed = 0 }}

[fixed]
model = "convnet"
epochs = {epochs}
batch_size = 32
device = "cpu"
warmup_epochs = 1
model_params = {{ channels = [8, 16], padding = 1, fc = [32] }}

[space.lr]
type = "float"
low = 1e-6
high = 3e-2
log = true

[space.optimizer]
type = "categorical"
choices = ["sgd", "adam"]

[space.momentum]
type = "float"
low = 0.0
high = 0.95
when = {{ optimizer = ["sgd"] }}

[sampler]
name = "TPESampler"
kwargs = {{ seed = 0, n_startup_trials = 3 }}

[pruner]
{pruner}
{enqueue}
""")
    return path


QUICK_STUDY = """
[study]
name = "{name}"
n_trials = {n_trials}
description = "{description}"

[data]
dataset = "synthetic"
data_options = {{ n = {n}, classes = 3, size = 8, channels = 1 }}

[fixed]
model = "convnet"
epochs = 2
batch_size = 32
device = "cpu"
warmup_epochs = 5                # no divergence check in two epochs: every trial completes
model_params = {{ channels = [4], padding = 1, fc = [8] }}

[space.lr]
type = "float"
low = 3e-3
high = 3e-2
log = true

[space.optimizer]
type = "categorical"
choices = ["adam", "adamw"]

[sampler]
name = "RandomSampler"
kwargs = {{ seed = 0 }}
"""


def quick_study(folder: Path, name: str = "tiny", n_trials: int = 2, n: int = 400, run: bool = True,
                description: str = "tiny synthetic study whose trials all complete") -> str:
    """Create (and by default run, with the real worker) a study whose trials all complete,
    for tests of what comes after the search; returns its SQLite URL."""
    from search import spec as spec_mod
    from search import study as study_mod
    from search.worker import run_worker

    path = folder / f"{name}.toml"
    path.write_text(QUICK_STUDY.format(name=name, n_trials=n_trials, n=n, description=description))
    url = f"sqlite:///{folder / 'study.db'}"
    study_mod.create(spec_mod.load_spec(path), url)
    if run:
        run_worker(name, url, device="cpu", seed_offset=0)
    return url


def assert_one_line_error(result, fragment: str) -> None:
    """A CLI user error: exit 1, exactly one `error: ...` line on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def worker_cmd(name: str, url: str, *extra: str) -> list[str]:
    return [*CNNSEARCH, "worker", name, "--storage", url, "--device", "cpu",
            "--quiet", "--threads", "1", *extra]


def _default_sigint() -> None:
    """In the child before exec: SIGINT as a terminal gives it. pytest run in the background by a
    shell without job control (`cmd &` in a script, as CI may be) inherits SIGINT ignored, and
    so would every worker started here: a signal sent before the worker installs its handlers
    would then be dropped, not stop it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_worker(name: str, url: str, *extra: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen(worker_cmd(name, url, *extra), stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_default_sigint)


def stop_all(procs) -> None:
    """Kill the processes still running (None entries: never started) and reap them."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture
def pg_url():
    """A scratch PostgreSQL database, dropped afterwards. CI sets CNNSEARCH_TEST_PG; elsewhere
    these tests skip, saying how to run them."""
    admin = os.environ.get(PG_ADMIN_ENV)
    if not admin:
        pytest.skip(f"set {PG_ADMIN_ENV}=postgresql+psycopg://postgres@127.0.0.1:5432/postgres "
                    "to run the PostgreSQL tests (CI sets it)")
    import sqlalchemy

    db = f"cnnsearch_test_{uuid.uuid4().hex[:10]}"
    # No pooled connection: a test may restart the server, and the clean-up must still work.
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{db}"'))
    url = str(sqlalchemy.engine.make_url(admin).set(database=db).render_as_string(hide_password=False))
    try:
        yield url
    finally:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        engine.dispose()


def export_best(folder: Path, url: str, name: str = "tiny") -> Path:
    """`cnnsearch export NAME -o folder/best.json` through the CLI; the file's path."""
    from typer.testing import CliRunner

    from search.cli import app

    result = CliRunner().invoke(app, ["export", name, "-o", str(folder / "best.json"), "--storage", url])
    assert result.exit_code == 0, result.output
    return folder / "best.json"
