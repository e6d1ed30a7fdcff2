"""Faults a search must survive: killed and interrupted workers, database restarts and outages,
crashing and diverging trials, racing creators, and storage passwords that must never show.

Each test injects the fault for real (SIGKILL, SIGTERM, `pg_ctlcluster restart`, a TCP proxy
that is cut) on tiny synthetic studies; docs/reliability.md lists them with measured times.
Run with `-s` to see the timings each test prints as `[reliability] ...`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

import search.engine
from search import spec as spec_mod
from search import study as study_mod
from search.cli import app
from search.storage import open_storage
from search.worker import run_worker
from studykit import pg_url, start_worker, stop_all, tiny_study  # noqa: F401 (fixture)

runner = CliRunner()
NOP = 'name = "NopPruner"'
FAST_HEARTBEAT = ("--heartbeat", "1", "--grace", "4")
# First trials that train for all their epochs (no early stop), one per worker.
GOOD = "".join(f'[[enqueue]]\nlr = {lr}\noptimizer = "adam"\n' for lr in (3e-3, 4e-3, 5e-3))


def note(text: str) -> None:
    print(f"[reliability] {text}")


@functools.cache
def _reader(url: str) -> optuna.storages.BaseStorage:
    return open_storage(url, heartbeat_interval=None)  # pre-pinged pool: survives a server restart


def trials_of(url: str, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=_reader(url)).get_trials(deepcopy=False)


def counts(trials) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def wait_for(check, timeout: float, what: str, procs=()):
    """Poll `check()` until it returns something truthy; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"a worker exited early while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def running_trial_of(url: str, pid: int, epochs: int = 1):
    """The RUNNING trial of worker `pid` once it has reported `epochs` epochs (mid-training)."""
    for t in trials_of(url):
        if t.state == TrialState.RUNNING and t.user_attrs.get("pid") == pid and len(t.intermediate_values) >= epochs:
            return t
    return None


def retries_of(trials, number: int):
    return [t for t in trials if t.system_attrs.get("failed_trial") == number]


def logs(paths) -> str:
    return "\n".join(f"--- {p}\n{Path(p).read_text()}" for p in paths if Path(p).exists())


# --- worker crashes and interrupts -------------------------------------------------------------


@pytest.mark.postgres
def test_killed_workers_trial_is_failed_and_retried_by_a_survivor(tmp_path, pg_url):
    # 30 epochs: a 6-epoch trial (under a second on a quiet machine) could finish between being
    # seen running and the SIGKILL, and end COMPLETE (seen once in CI)
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=6, epochs=30, pruner=NOP, enqueue=GOOD)), pg_url)
    paths = [tmp_path / f"w{k}.log" for k in range(3)]
    procs = [start_worker("tiny", pg_url, "--seed-offset", str(k), *FAST_HEARTBEAT, log=paths[k]) for k in range(3)]
    try:
        victim = procs[0]
        doomed = wait_for(lambda: running_trial_of(pg_url, victim.pid), 180, "a trial of the victim", procs)
        victim.kill()
        killed_at = datetime.now()
        victim.wait()
        codes = [p.wait(timeout=300) for p in procs[1:]]
    finally:
        stop_all(procs)
    assert codes == [0, 0], logs(paths)
    trials = trials_of(pg_url)
    by_number = {t.number: t for t in trials}
    assert by_number[doomed.number].state == TrialState.FAIL
    retries = retries_of(trials, doomed.number)
    assert len(retries) == 1, logs(paths)
    retry = retries[0]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED), retry
    assert retry.params == doomed.params and retry.system_attrs["retry_history"] == [doomed.number]
    assert retry.user_attrs["pid"] in {p.pid for p in procs[1:]}
    count = counts(trials)
    assert count.get("COMPLETE", 0) + count.get("PRUNED", 0) == 6, count
    assert "RUNNING" not in count and "WAITING" not in count, count
    failed_after = (by_number[doomed.number].datetime_complete - killed_at).total_seconds()
    retried_after = (retry.datetime_start - killed_at).total_seconds()
    note(f"SIGKILL: trial {doomed.number} failed {failed_after:.1f} s after the kill (grace 4 s), "
         f"retried as trial {retry.number} after {retried_after:.1f} s, finished {retry.state.name}")


def test_ctrl_c_fails_the_running_trial_and_the_worker_exits_promptly(tmp_path):
    """SIGINT here; SIGTERM reaches workers through launch in the next test."""
    sig = signal.SIGINT
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=20, epochs=40, pruner=NOP,
                                                   enqueue=GOOD)), url)
    log = tmp_path / "w.log"
    proc = start_worker("tiny", url, log=log)
    try:
        trial = wait_for(lambda: running_trial_of(url, proc.pid), 120, "a running trial", [proc])
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        stop_all([proc])
    assert code == 130, log.read_text()
    assert "interrupted" in log.read_text()
    trials = trials_of(url)
    done = {t.number: t for t in trials}[trial.number]
    assert done.state == TrialState.FAIL and done.user_attrs["stop_reason"] == "interrupted"
    assert "RUNNING" not in counts(trials)
    queued = retries_of(trials, trial.number)  # an interrupted trial (say the enqueued baseline) runs again once
    assert [t.state for t in queued] == [TrialState.WAITING] and queued[0].params == done.params
    note(f"{sig.name}: worker exited {code} {took:.1f} s after the signal; trial {trial.number} FAIL "
         "'interrupted', queued again once")


@pytest.mark.parametrize("after,delay", [("start", 0.05), ("start", 0.4), ("start", 1.5),
                                         ("banner", 0.0), ("banner", 0.15), ("banner", 0.5)])
def test_a_signal_in_a_workers_first_seconds_stops_it(tmp_path, after, delay):
    """SIGINT while the worker starts and prepares its first trial (`after` its start, or its
    banner, the line it prints just before the worker loop loads the data). Seen before: the
    KeyboardInterrupt landed in a garbage-collection callback, Python printed "Exception
    ignored", and the worker ran the whole study and exited 0."""
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=20, epochs=40, pruner=NOP,
                                                   enqueue=GOOD)), url)
    log = tmp_path / "w.log"
    proc = start_worker("tiny", url, log=log)
    try:
        if after == "banner":
            wait_for(lambda: "worker for" in log.read_text(), 120, "the worker's banner", [proc])
        time.sleep(delay)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        stop_all([proc])
    text = log.read_text()
    # Before Python runs any cnnsearch code (the first imports) the signal is Python's own: the
    # process ends killed by SIGINT, which a shell reports as 130 as well. (Seen rarely during
    # the imports even after "interrupted" was printed: CPython's own exit.) Earlier still, in
    # the interpreter's own start-up (the site module, the standard streams), CPython stops
    # with "Fatal Python error: init_..." and exit 1: seen at 0.02-0.05 s on a busy machine.
    in_startup = code == 1 and text.startswith("Fatal Python error: init_")
    assert (code in (130, -signal.SIGINT) or in_startup) and took < 30, text
    assert "worker done" not in text, text  # it did not go on to run the study
    count = counts(trials_of(url))
    assert "RUNNING" not in count and count.get("COMPLETE", 0) + count.get("PRUNED", 0) == 0, (count, text)
    note(f"SIGINT {delay} s after the worker's {after}: exit {code} {took:.1f} s later; trials {count}")


def test_a_signal_during_a_database_call_takes_effect_when_the_call_returns():
    """Raised inside SQLAlchemy, a KeyboardInterrupt can leave a transaction open and a SQLite
    lock held, which the worker's clean-up then waits on. Seen once before this deferral: after
    SIGTERM both workers of a `launch` on SQLite took over 60 s (SQLite's lock timeout) to exit
    and left their trials RUNNING; an interrupt inside a database call is the likely cause."""
    from search.worker import _raise_interrupt

    fake_driver = {"__name__": "sqlalchemy.engine.fake"}
    exec("def execute(during):\n    during()\n    return 'committed'", fake_driver)
    handled = (signal.SIGINT, signal.SIGALRM)
    previous = {s: signal.signal(s, _raise_interrupt) for s in handled}
    returned = []
    try:
        with pytest.raises(KeyboardInterrupt):
            returned.append(fake_driver["execute"](lambda: os.kill(os.getpid(), signal.SIGINT)))
            time.sleep(5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert returned == ["committed"]


def test_launch_forwards_sigterm_to_every_worker(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=20, epochs=40, pruner=NOP,
                                                   enqueue=GOOD)), url)
    out = tmp_path / "launch.out"
    with open(out, "wb") as f:
        launcher = subprocess.Popen([sys.executable, "-m", "search.cli", "launch", "tiny", "--storage", url,
                                     "--cpus", "2", "--log-dir", str(tmp_path / "logs")],
                                    stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        pids = wait_for(lambda: re.findall(r"\(pid (\d+),", out.read_text())[1:] and
                        [int(p) for p in re.findall(r"\(pid (\d+),", out.read_text())], 60, "two workers", [launcher])
        wait_for(lambda: all(running_trial_of(url, pid) for pid in pids), 180, "a trial in each worker", [launcher])
        sent = time.monotonic()
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        stop_all([launcher])
    text = out.read_text() + logs((tmp_path / "logs").glob("*.log"))
    assert code == 1 and "workers exited with codes [130, 130]" in text, text
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    trials = trials_of(url)
    assert "RUNNING" not in counts(trials)
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.user_attrs["pid"] for t in interrupted) == sorted(pids)
    assert all(t.user_attrs["stop_reason"] == "interrupted" for t in interrupted)
    note(f"launch --cpus 2, SIGTERM: launch and both workers exited in {took:.1f} s; both trials 'interrupted'")


# --- the database goes away ----------------------------------------------------------------------


def _pg_cluster(url: str) -> tuple[str, str]:
    """(version, cluster) of the local server behind `url`, or skip saying why."""
    parsed = make_url(url)
    if parsed.host not in ("127.0.0.1", "localhost") or not shutil.which("pg_ctlcluster"):
        pytest.skip("restarting PostgreSQL needs the server on 127.0.0.1 and pg_ctlcluster (Debian/Ubuntu)")
    listing = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True).stdout.split("\n")
    for line in listing:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == str(parsed.port or 5432):
            return fields[0], fields[1]
    pytest.skip(f"no local cluster on port {parsed.port or 5432} in pg_lsclusters")


def _pg_ctl(version: str, cluster: str, action: str) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, action],
                   check=True, capture_output=True, timeout=120)


def _pg_is_up(url: str) -> bool:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        return True
    except sqlalchemy.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_workers_reconnect_after_a_postgresql_restart(tmp_path, pg_url):
    version, cluster = _pg_cluster(pg_url)
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=8, epochs=20, pruner=NOP, enqueue=GOOD)), pg_url)
    paths = [tmp_path / f"w{k}.log" for k in range(2)]
    # grace 10 s: longer than the restart, so only a worker's own cut-off trial is failed
    procs = [start_worker("tiny", pg_url, "--seed-offset", str(k), "--heartbeat", "1", "--grace", "10",
                          log=paths[k]) for k in range(2)]
    try:
        wait_for(lambda: counts(trials_of(pg_url)).get("COMPLETE", 0) >= 1
                 and any(running_trial_of(pg_url, p.pid) for p in procs), 180, "1 finished and 1 running", procs)
        before = {t.number: (t.state, t.value) for t in trials_of(pg_url) if t.state.is_finished()}
        restarted = time.monotonic()
        try:
            _pg_ctl(version, cluster, "restart")
        finally:
            if not _pg_is_up(pg_url):
                _pg_ctl(version, cluster, "start")
            wait_for(lambda: _pg_is_up(pg_url), 60, "PostgreSQL to accept connections again")
        restart_s = time.monotonic() - restarted
        codes = [p.wait(timeout=300) for p in procs]
        total_s = time.monotonic() - restarted
    finally:
        stop_all(procs)
    text = logs(paths)
    assert codes == [0, 0], text
    assert "Exception in thread" not in text, text  # the heartbeat threads lived through it
    trials = trials_of(pg_url)
    after = {t.number: (t.state, t.value) for t in trials}
    assert all(after[n] == v for n, v in before.items())  # nothing finished was lost
    count = counts(trials)
    assert count.get("COMPLETE", 0) + count.get("PRUNED", 0) == 8, count
    assert "RUNNING" not in count and "WAITING" not in count, count
    cut = [t for t in trials if t.user_attrs.get("stop_reason") == "storage outage"]
    for t in cut:
        assert t.state == TrialState.FAIL
        assert [r.state.is_finished() for r in retries_of(trials, t.number)] == [True]
    note(f"PostgreSQL restart took {restart_s:.1f} s; workers finished the study {total_s:.1f} s after it began; "
         f"{len(cut)} cut-off trial(s) failed and retried; worker lines about it: "
         f"{text.count('storage unreachable')}")


class Proxy:
    """A TCP proxy to PostgreSQL that the test can cut: an outage without stopping the server."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.mark.postgres
def test_worker_gives_up_after_a_bounded_wait_with_one_line(tmp_path, pg_url):
    parsed = make_url(pg_url)
    proxy = Proxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    url = parsed.set(host="127.0.0.1", port=proxy.port, password="sekrit").render_as_string(hide_password=False)
    study_mod.create(spec_mod.load_spec(tiny_study(tmp_path, n_trials=20, epochs=40, pruner=NOP)), url)
    log = tmp_path / "w.log"
    proc = start_worker("tiny", url, "--reconnect-for", "5", log=log)
    try:
        wait_for(lambda: running_trial_of(pg_url, proc.pid), 120, "a running trial", [proc])
        proxy.cut()
        cut_at = time.monotonic()
        code = proc.wait(timeout=120)
        took = time.monotonic() - cut_at
    finally:
        stop_all([proc])
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 1, text
    assert lines[-1].startswith("error: lost the storage at 127.0.0.1 ") and "giving up" in lines[-1], text
    assert "Traceback" not in text and "sekrit" not in text, text
    note(f"database cut for good: the worker retried and exited 1 after {took:.1f} s (--reconnect-for 5) "
         f"with: {lines[-1]}")


@pytest.mark.parametrize("command", ["create", "worker", "status", "launch", "run"])
def test_unreachable_database_at_start_is_one_line_with_the_host(tmp_path, command):
    url = "postgresql+psycopg://bob:sekrit@127.0.0.1:1/cnn"
    name = [str(tiny_study(tmp_path))] if command in ("create", "run") else ["tiny"]
    result = runner.invoke(app, [command, *name, "--storage", url])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the storage at 127.0.0.1"), result.output
    assert "sekrit" not in result.output and "bob:***@127.0.0.1:1/cnn" in lines[0]


@pytest.mark.parametrize("args,fragment", [
    (["create", "missing.toml"], "missing.toml: no such file"),
    (["run", "missing.toml"], "missing.toml: no such file"),
    (["create", "{study}", "--set", "study.n_trials=many"], "study.n_trials: expected an integer >= 1"),
    (["create", "{study}", "--set", "n_trials"], "expected key=value"),
    (["create", "{bad}"], "study.n_trials: expected an integer >= 1, got 0"),
    (["worker", "nope"], "no study named 'nope' (studies here: foreign, tiny)"),
    (["worker", "foreign"], "study 'foreign' was not created by cnnsearch (no stored spec)"),
    (["status", "nope"], "no study named 'nope' (studies here: foreign, tiny)"),
    (["launch", "nope", "--cpus", "1"], "no study named 'nope' (studies here: foreign, tiny)"),
    (["worker", "tiny", "--device", "cuda:7"], "cuda:7 requested but no CUDA device"),
    (["worker", "tiny", "--device", "tpu"], "device: expected auto, cpu, cuda or cuda:N"),
    (["launch", "tiny", "--gpus", "zero"], "--gpus: expected 'all' or a list like 0,1"),
    (["status", "tiny", "--storage", "not a url"], "malformed storage URL"),
    (["worker", "tiny", "--storage", "nosuchdb://x/y"], "unknown database driver 'nosuchdb'"),
    (["launch", "tiny", "--storage", "postgresql+nosuchdriver://u:sekrit@h/db"], "unknown database driver"),
])
def test_bad_input_to_the_search_commands_is_one_line_and_exit_1(tmp_path, monkeypatch, args, fragment):
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.chdir(tmp_path)
    study = tiny_study(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(study.read_text().replace("n_trials = 6", "n_trials = 0"))
    study_mod.create(spec_mod.load_spec(study), "sqlite:///cnnsearch.db")
    optuna.create_study(study_name="foreign", storage="sqlite:///cnnsearch.db")  # made without cnnsearch
    result = runner.invoke(app, [a.format(study=study, bad=bad) for a in args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert "sekrit" not in result.output and "Traceback" not in result.output


# --- trials that crash or diverge ---------------------------------------------------------------


def test_crashing_trials_are_recorded_and_the_worker_goes_on(tmp_path, monkeypatch):
    """An architecture too deep for 8x8 inputs is rejected before training (pruned, not a crash);
    a trial whose training raises is failed with the error's first line; the study goes on."""
    url = f"sqlite:///{tmp_path}/s.db"
    path = tiny_study(tmp_path, n_trials=3, epochs=2, enqueue="""
[space.pool]
type = "categorical"
choices = ["max", "none"]
""")
    text = path.read_text().replace("size = 12", "size = 8").replace("channels = [8, 16]",
                                                                     'channels = [4, 4, 4, 4], pool = "none"')
    path.write_text(text)
    study = study_mod.create(spec_mod.load_spec(path), url).study
    # Queued by hand: create refuses an [[enqueue]] whose model cannot fit, not a space where some can't.
    for pool, lr in (("max", 1e-3), ("none", 2e-3), ("none", 3e-3)):
        study.enqueue_trial({"pool": pool, "lr": lr, "optimizer": "adam"})
    real_fit = search.engine.fit

    def fit(cfg, *args, **kwargs):
        if cfg.lr == 2e-3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nsee the allocator docs")
        if cfg.lr == 3e-3:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x36 and 64x32)")
        return real_fit(cfg, *args, **kwargs)

    monkeypatch.setattr(search.engine, "fit", fit)
    result = run_worker("tiny", url, device="cpu")
    assert result.stopped_because == "budget reached"
    trials = trials_of(url)
    rejected, oom, shape = trials[:3]
    assert rejected.state == TrialState.PRUNED and "error" not in rejected.user_attrs
    assert rejected.user_attrs["stop_reason"].startswith("rejected: convnet: block 4 shrinks the 8x8 input")
    assert oom.state == TrialState.FAIL and oom.user_attrs["stop_reason"] == "crashed"
    assert oom.user_attrs["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert shape.state == TrialState.FAIL and shape.user_attrs["error"].startswith("RuntimeError: mat1 and mat2")
    count = counts(trials)
    assert count.get("COMPLETE", 0) + count.get("PRUNED", 0) == 3 and count["FAIL"] == 2, count


def test_diverging_trials_are_pruned_with_their_reason_and_the_study_goes_on(tmp_path):
    """The hand-tuned failures on the three-conv CIFAR-10 net, on synthetic 3x32x32 data (600
    images, 2 epochs). What happens, honestly: Adam at lr 0.1 does not reach NaN here; its training
    loss explodes (hundreds to thousands) and validation accuracy stays at chance, so the
    chance-level rule stops it. Adam at lr 1e-5 barely moves: at chance, stopped the same way.
    SGD at lr 10 (momentum 0.9) gives a NaN loss in the first epoch. Adam at 1e-3 learns."""
    url = f"sqlite:///{tmp_path}/s.db"
    path = tmp_path / "div.toml"
    path.write_text("""
[study]
name = "tiny"
n_trials = 4

[data]
dataset = "synthetic"
data_options = { n = 600, classes = 10, channels = 3, size = 32, seed = 0 }

[fixed]
model = "cifar_threeconv"
epochs = 2
warmup_epochs = 2
batch_size = 64
device = "cpu"

[space.lr]
type = "float"
low = 1e-5
high = 10.0
log = true

[space.optimizer]
type = "categorical"
choices = ["adam", "sgd"]

[space.momentum]
type = "float"
low = 0.0
high = 0.9
when = { optimizer = ["sgd"] }

[pruner]
name = "NopPruner"

[[enqueue]]
lr = 0.1
optimizer = "adam"
[[enqueue]]
lr = 1e-5
optimizer = "adam"
[[enqueue]]
lr = 10.0
optimizer = "sgd"
momentum = 0.9
[[enqueue]]
lr = 1e-3
optimizer = "adam"
""")
    study_mod.create(spec_mod.load_spec(path), url)
    torch.set_num_threads(1)
    result = run_worker("tiny", url, device="cpu")
    assert result.stopped_because == "budget reached" and result.trials_run == 4
    high, low, nan, good = trials_of(url)
    for t in (high, low):
        assert t.state == TrialState.PRUNED
        assert re.match(r"diverged: validation accuracy .* still at chance level", t.user_attrs["stop_reason"]), t
    assert nan.state == TrialState.PRUNED
    assert nan.user_attrs["stop_reason"] == "diverged: training loss became nan in epoch 1"
    assert good.state == TrialState.COMPLETE and good.value > 0.5
    note("divergence: " + "; ".join(f"lr {t.params['lr']:g} {t.params['optimizer']}: {t.user_attrs['stop_reason']}"
                                    for t in (high, low, nan)) + f"; lr 1e-3 adam: {good.value:.1%}")


# --- racing creators -----------------------------------------------------------------------------

RACER = """
import pathlib, sys, time
import models, optuna_dashboard, psycopg, search.cli, search.dashboard  # slow imports before the start line
go = pathlib.Path(sys.argv[1])
pathlib.Path(sys.argv[2]).touch()
while not go.exists():
    time.sleep(0.002)
sys.argv = ["cnnsearch", "create", sys.argv[3], "--storage", sys.argv[4]]
search.cli.app()
"""


@pytest.mark.postgres
def test_eight_processes_create_the_same_study_on_an_empty_database(tmp_path, pg_url):
    enqueue = '[[enqueue]]\nlr = 1e-3\noptimizer = "adam"\n[[enqueue]]\nlr = 1e-2\noptimizer = "sgd"\nmomentum = 0.5\n'
    path = tiny_study(tmp_path, enqueue=enqueue)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(go), str(tmp_path / f"ready{k}"), str(path), pg_url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(8)]
    try:
        wait_for(lambda: len(list(tmp_path.glob("ready*"))) == 8, 240, "8 creators to be ready", procs)
        go.touch()  # all at once: schema creation, create_study and the enqueues race for real
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        stop_all(procs)
    assert [p.returncode for p in procs] == [0] * 8, outputs
    assert sum("created in" in o for o in outputs) == 1 and sum("already exists" in o for o in outputs) == 7, outputs
    assert not any("Traceback" in o or "error" in o for o in outputs), outputs
    storage = open_storage(pg_url, heartbeat_interval=None)
    assert [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)] == ["tiny"]
    trials = trials_of(pg_url)
    assert [t.state for t in trials] == [TrialState.WAITING] * 2
    assert sorted(t.system_attrs["fixed_params"]["lr"] for t in trials) == [1e-3, 1e-2]


# --- security ------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_storage_password_never_appears_anywhere(tmp_path, pg_url, monkeypatch):
    """Trust auth accepts any password, so a real worker runs with one in its URL."""
    secret = "sekrit"
    url = make_url(pg_url).set(password=secret).render_as_string(hide_password=False)
    monkeypatch.chdir(tmp_path)
    seen = []

    def cli(*args):
        result = runner.invoke(app, [*args, "--storage", url])
        assert result.exit_code == 0, result.output
        seen.append(result.output)

    cli("create", str(tiny_study(tmp_path, n_trials=2, epochs=2, enqueue=GOOD)))
    launched = subprocess.run([sys.executable, "-m", "search.cli", "launch", "tiny", "--storage", url, "--cpus", "1",
                               "--log-dir", "logs"], capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    seen += [launched.stdout, launched.stderr, logs((tmp_path / "logs").glob("*.log"))]
    assert "budget reached" in seen[-1]
    cli("status", "tiny")
    cli("best", "tiny")
    cli("list")
    cli("export", "tiny", "-o", "best.json")
    cli("report", "tiny", "-o", "report.html")
    seen += [(tmp_path / "best.json").read_text(), (tmp_path / "report.html").read_text()]
    bad = runner.invoke(app, ["status", "tiny", "--storage", url.replace("/cnnsearch_test", "/nosuchdb_")])
    assert bad.exit_code == 1
    seen.append(bad.output)
    study = optuna.load_study(study_name="tiny", storage=open_storage(url, heartbeat_interval=None))
    seen.append(json.dumps([study.user_attrs, study._storage.get_study_system_attrs(study._study_id)], default=str))
    seen += [json.dumps([t.user_attrs, t.system_attrs, t.params], default=str) for t in study.trials]
    seen.append(_dashboard_output(url))
    leaks = [s for s in seen if secret in s]
    assert not leaks, leaks[0][:2000]
    assert "postgres:***@" in "".join(seen)  # the URL is shown, masked


def _dashboard_output(url: str) -> str:
    """What `cnnsearch dashboard` prints and serves; it must listen on loopback by default."""
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "dashboard", "--storage", url, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/dashboard", first)
        assert match, first + proc.stdout.read() if proc.poll() is not None else first
        served = [urllib.request.urlopen(match.group(1) + path, timeout=30).read().decode()
                  for path in ("/dashboard", "/api/studies", "/api/meta")]
        return first + "".join(served)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_checkpoints_load_without_running_pickled_code(tmp_path):
    from search.errors import CheckpointError
    from search.modelfile import load_model_file

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    torch.save({"format": "anything", "x": Payload()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_model_file(tmp_path)
    assert not marker.exists()
