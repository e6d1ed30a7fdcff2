"""Coordination cost of many workers on PostgreSQL: scaling with 1, 2, 4, 8 worker processes, and
the storage time of one trial in a study that already holds 1,000 and 10,000 trials.

(a) Scaling: k worker processes run `search.worker.run_worker` (its real budget loop, the real
    objective from `search.objective`, storage from `search.storage.open_storage` with heartbeat)
    on a fresh scratch database. Only training is replaced: `search.engine.fit` sleeps a fixed
    time per epoch and reports each one, so trials wait instead of compute and 2 cores can host
    8 workers. Trials/s is counted from the trials' own start and end times in the database
    (process start-up is excluded); scaling efficiency = trials/s with k workers / (k x trials/s
    with 1 worker). Target: >= 90% at 8 workers. Worker CPU per trial and sampled PostgreSQL
    session states (active / waiting on a lock / idle) tell client-side cost from lock contention.
(b) Storage time per trial with a RandomSampler (storage cost, not TPE): study.ask(), the
    trial.report + should_prune calls and study.tell(), timed with time.perf_counter in a study
    prefilled to 1,000 and then 10,000 trials (targets <= 50 ms and <= 150 ms), plus the budget
    check `search.storage.count_trials`, the heartbeat's `fail_stale_trials` and the rest of what
    a worker writes per trial. The prefill adds a few template trials with `study.add_trials`
    and copies their rows in SQL (add_trials issues ~56 statements per trial).

Each worker count and part (b) get a fresh scratch database, all dropped at the end, also on
error; the database in --url is ignored, only the server and user are taken from it:

    python scripts/bench_workers.py
    python scripts/bench_workers.py --workers 1,8 --trial-seconds 3 --trials-per-worker 4 --skip-storage
    python scripts/bench_workers.py --skip-scaling --sizes 1000,10000,50000
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing as mp
import os
import statistics
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from search import engine, space
from search import spec as spec_mod
from search import study as study_mod
from search.storage import count_trials, open_storage
from search.worker import POLL_SECONDS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/scratch"
USER_ATTRS = {"host": "bench-host", "pid": 12345, "device": "cuda:0", "n_params": 52_000,  # what a real trial stores
              "epoch_seconds": [1.234] * 5, "train_seconds": 6.2, "stop_reason": "finished", "best_epoch": 4}
STATES = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")
_STEP_SECONDS = 0.1  # set in each worker process


@contextlib.contextmanager
def scratch_databases(url: str):
    """Yields make(tag) -> URL of a new empty database on url's server; drops them all on exit."""
    server = make_url(url)
    admin = sqlalchemy.create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make(tag: str) -> str:
        name = f"cnnsearch_bench_{os.getpid()}_{tag}"
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return server.set(database=name).render_as_string(hide_password=False)

    try:
        yield make
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        print(f"dropped scratch databases: {', '.join(made) or 'none'}")


def bench_spec(name: str, n_trials: int, steps: int) -> spec_mod.StudySpec:
    """digits_quick's space with RandomSampler, a MedianPruner that judges from step 0, `steps` epochs."""
    base = spec_mod.load_spec(REPO / "studies" / "digits_quick.toml")
    spec = dataclasses.replace(
        base, name=name, n_trials=n_trials, timeout=None, enqueue=(), fixed={**base.fixed, "epochs": steps},
        sampler=spec_mod.ClassSpec("RandomSampler", {"seed": 0}),
        pruner=spec_mod.ClassSpec("MedianPruner", {"n_startup_trials": 5, "n_warmup_steps": 0}))
    return spec_mod.spec_from_dict(spec_mod.spec_to_dict(spec), source="bench spec")


def sleeping_fit(cfg, on_epoch=None, *, dataset=None, evaluate_test=False, full_train=False):
    """Stands in for engine.fit: each epoch sleeps, then reports. Every trial reports the same
    value, so the MedianPruner reads the study on every step but never prunes (a tie is kept)."""
    history = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        time.sleep(_STEP_SECONDS)
        metrics = {"epoch": epoch, "val_acc": 0.5, "val_loss": 1.0, "seconds": time.perf_counter() - t0}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return engine.FitResult(history=history, best_val_acc=0.5, best_epoch=len(history) - 1,
                            stop_reason="finished", model=None, n_params=0, device="cpu", precision="fp32")


def worker_process(url: str, spec: spec_mod.StudySpec, index: int, step_seconds: float, barrier, results) -> None:
    global _STEP_SECONDS
    import torch

    import models
    from search import datasets, worker

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # an OverBudget race at the end is expected; states are counted
    _STEP_SECONDS = step_seconds
    engine.fit = sleeping_fit  # this process only: everything else is the real worker
    cfg = space.params_to_config(spec, space.fill_params(spec.space, {})).replace(device="cpu")
    ds = datasets.dataset_for(cfg)  # per-process caches filled before the clock starts, as after a real first trial
    models.build_model(cfg, ds.in_shape, ds.num_classes)
    barrier.wait()
    started, cpu = time.monotonic(), time.process_time()
    result = worker.run_worker(spec.name, url, device="cpu", seed_offset=index)
    results.put((index, result.trials_run, result.stopped_because, started, time.monotonic(),
                 time.process_time() - cpu))


def run_scaling(make_db, k: int, args, ctx) -> dict:
    url = make_db(f"w{k}")
    spec = bench_spec(f"bench_workers_{k}", k * args.trials_per_worker, args.steps)
    study_mod.create(spec, url)
    barrier, results = ctx.Barrier(k + 1), ctx.Queue()
    procs = [ctx.Process(target=worker_process, args=(url, spec, i, args.trial_seconds / args.steps, barrier, results))
             for i in range(k)]
    spawn = time.monotonic()
    for p in procs:
        p.start()
    stop, waits = threading.Event(), Counter()
    sampler = threading.Thread(target=sample_waits, args=(url, stop, waits), daemon=True)
    try:
        barrier.wait(timeout=300)
        go = time.monotonic()
        sampler.start()
        done = [results.get(timeout=120 + 4 * spec.n_trials * args.trial_seconds) for _ in procs]
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    storage = open_storage(url, heartbeat_interval=None)
    trials = optuna.load_study(study_name=spec.name, storage=storage).get_trials(deepcopy=False)
    storage.engine.dispose()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished]
    return {"k": k, "trials": len(finished), "states": Counter(t.state.name for t in trials), "span": span,
            "rate": len(finished) / span, "trial_s": statistics.mean(durations), "startup": go - spawn,
            "exit": max(d[4] for d in done) - go, "stops": Counter(d[2] for d in done),
            "cpu": sum(d[5] for d in done), "waits": waits}


def sample_waits(url: str, stop: threading.Event, waits: Counter) -> None:
    """What the workers' database sessions are doing, every 50 ms: running, idle, or waiting on a lock."""
    db = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text("SELECT state, wait_event_type FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with db.connect() as conn:
        while not stop.wait(0.05):
            for state, wait in conn.execute(query):
                waits["lock" if wait == "Lock" else "active" if state == "active" else "idle"] += 1
            conn.rollback()  # a fresh snapshot of pg_stat_activity each time
    db.dispose()


def prefill(study: optuna.Study, spec: spec_mod.StudySpec, target: int, templates: int, steps: int,
            seed: int = 0) -> float:
    """Grows the study to `target` trials; returns seconds per trial of study.add_trials (0 if unused).

    The first `templates` trials are real ones (random params of the spec's space, intermediate
    values, the user attrs a worker writes; a third PRUNED) added with study.add_trials; the rest
    are SQL copies of their rows, which is what 10,000 add_trials calls would have written.
    """
    have = len(study.get_trials(deepcopy=False))
    per_add = 0.0
    if have < templates:
        rng = optuna.samplers.RandomSampler(seed=seed)
        scratch = optuna.create_study(sampler=rng)
        made = []
        for i in range(have, templates):
            t = scratch.ask()
            space.suggest_params(t, spec)
            pruned = i % 3 == 2
            values = {s: 0.3 + 0.6 * ((i * 7919 + s * 104729) % 1000) / 1000 for s in range(2 if pruned else steps)}
            made.append(optuna.trial.create_trial(
                state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
                value=values[max(values)], params=t.params, distributions=t.distributions,
                intermediate_values=values, user_attrs=USER_ATTRS))
        started = time.perf_counter()
        study.add_trials(made)
        per_add = (time.perf_counter() - started) / len(made)
        have = templates
    if target > have:
        _copy_trials(study._storage._backend.engine, study._study_id, templates, have, target)
    return per_add


def _copy_trials(db: sqlalchemy.Engine, study_id: int, templates: int, have: int, target: int) -> None:
    """Trials number have..target-1 as copies of trial (number % templates), child rows included."""
    children = {"trial_params": "param_name, param_value, distribution_json",
                "trial_values": "objective, value, value_type",
                "trial_intermediate_values": "step, intermediate_value, intermediate_value_type",
                "trial_user_attributes": "key, value_json", "trial_system_attributes": "key, value_json"}
    q = {"sid": study_id, "n": templates, "lo": have, "hi": target - 1}
    with db.begin() as conn:
        conn.execute(sqlalchemy.text(
            "INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete) "
            "SELECT g, t.study_id, t.state, t.datetime_start, t.datetime_complete "
            "FROM generate_series(CAST(:lo AS integer), CAST(:hi AS integer)) g "
            "JOIN trials t ON t.study_id = :sid AND t.number = g % :n ORDER BY g"), q)
        conn.execute(sqlalchemy.text(
            "CREATE TEMP TABLE copy_map ON COMMIT DROP AS SELECT s.trial_id AS src, d.trial_id AS dst "
            "FROM trials d JOIN trials s ON s.study_id = d.study_id AND s.number = d.number % :n "
            "WHERE d.study_id = :sid AND d.number BETWEEN :lo AND :hi"), q)
        for table, cols in children.items():
            conn.execute(sqlalchemy.text(f"INSERT INTO {table} (trial_id, {cols}) SELECT m.dst, {cols} "
                                         f"FROM {table} c JOIN copy_map m ON c.trial_id = m.src"))
        conn.execute(sqlalchemy.text("ANALYZE"))


def count_query(study: optuna.Study, states: tuple[str, ...]) -> int:
    """count_trials' own COUNT query on the RDBStorage behind optuna's cache (the proposed fix)."""
    statement = sqlalchemy.text("SELECT COUNT(*) FROM trials WHERE study_id = :study AND state IN :states") \
        .bindparams(sqlalchemy.bindparam("states", expanding=True))
    with study._storage._backend.engine.connect() as conn:
        return conn.execute(statement, {"study": study._study_id, "states": list(states)}).scalar_one()


def timed(fn, *a, **kw) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn(*a, **kw)
    return (time.perf_counter() - started) * 1000, out


def measure_storage(url: str, spec: spec_mod.StudySpec, n: int, steps: int) -> dict:
    """A fresh worker's view: open, first budget check, first ask (fills Optuna's trial cache), then
    n trials of ask/suggest/report/tell."""
    ms_open, storage = timed(open_storage, url)  # the worker's settings: heartbeat on
    study = optuna.load_study(study_name=spec.name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=1),
                              pruner=spec_mod.make_pruner(spec))
    ms_cold_count, size = timed(count_trials, study, (*STATES, "FAIL"))  # as run_worker's first call
    ms_cold_ask, trial = timed(study.ask)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    rows: dict[str, list[float]] = {k: [] for k in ("ask", "suggest", "attrs", "report", "prune", "tell",
                                                    "stale", "count", "count_sql")}
    for i in range(n):
        rows["stale"].append(timed(optuna.storages.fail_stale_trials, study)[0])  # optimize() runs it per trial
        rows["count"].append(timed(count_trials, study, STATES)[0])
        rows["count_sql"].append(timed(count_query, study, STATES)[0])
        ms, trial = timed(study.ask)
        rows["ask"].append(ms)
        rows["suggest"].append(timed(space.suggest_params, trial, spec)[0])
        report = prune = 0.0
        for step in range(steps):
            report += timed(trial.report, 0.5, step)[0]
            prune += timed(trial.should_prune)[0]
        rows["report"].append(report)
        rows["prune"].append(prune)
        started = time.perf_counter()
        for key, value in USER_ATTRS.items():
            trial.set_user_attr(key, value)
        rows["attrs"].append((time.perf_counter() - started) * 1000)
        rows["tell"].append(timed(study.tell, trial, 0.5)[0])
    storage.engine.dispose()
    return {"size": size, "open": ms_open, "cold_count": ms_cold_count, "cold_ask": ms_cold_ask, **rows}


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))]


def print_scaling(args, make_db) -> None:
    counts = [int(k) for k in args.workers.split(",")]
    ctx = mp.get_context("forkserver")
    # Workers fork from a server that has imported these once; fork is safe there (no torch threads yet).
    ctx.set_forkserver_preload(["torch", "optuna", "models", "search.worker", "search.datasets"])
    print(f"(a) scaling: worker processes on PostgreSQL, each trial sleeps {args.trial_seconds} s in {args.steps} "
          f"reported epochs; budget {args.trials_per_worker} trials per worker; RandomSampler, MedianPruner (reads "
          "the study every step, never prunes); heartbeat on")
    print(f"{'workers':>7s} {'trials':>6s} {'span s':>7s} {'trials/s':>8s} {'efficiency':>10s} {'trial s':>7s} "
          f"{'gap s':>6s} {'cpu ms':>6s} {'cores':>5s} {'exit s':>6s} {'start s':>7s} {'db sessions':>20s}  "
          "states; stop reasons")
    base = None
    for k in counts:
        r = run_scaling(make_db, k, args, ctx)
        base = base or r
        eff = r["rate"] / (r["k"] / base["k"] * base["rate"])
        gap = r["span"] * r["k"] / r["trials"] - r["trial_s"]  # worker time between two of its trials
        n = sum(r["waits"].values()) or 1
        sessions = "/".join(f"{100 * r['waits'][w] / n:.0f}" for w in ("active", "lock", "idle"))
        print(f"{k:7d} {r['trials']:6d} {r['span']:7.2f} {r['rate']:8.2f} {eff:10.0%} {r['trial_s']:7.3f} "
              f"{gap:6.3f} {1000 * r['cpu'] / r['trials']:6.0f} {r['cpu'] / r['exit']:5.2f} {r['exit']:6.2f} "
              f"{r['startup']:7.1f} {sessions:>20s}  {dict(r['states'])}; {dict(r['stops'])}", flush=True)
    print(f"efficiency = trials/s / (k x trials/s of {counts[0]} worker(s) / {counts[0]}); target >= 90% at 8. "
          "span: first trial start -> last trial end (database times). trial s: mean start -> tell of one trial "
          f"({args.trial_seconds} s asleep). gap: mean worker time between its trials (budget checks, "
          "fail_stale_trials, ask). cpu ms: worker CPU per trial, all workers (Python side; PostgreSQL's own CPU "
          f"not included). cores: worker CPU / exit time, of the machine's {os.cpu_count()}. exit: start signal -> "
          f"last worker returned (includes the worker's {POLL_SECONDS:g} s poll while the last slots are in "
          "flight). start: process start-up, not counted. db sessions: % of sampled worker sessions "
          "active/waiting on a lock/idle.\n")


def print_storage(args, make_db) -> None:
    url = make_db("storage")
    spec = bench_spec("bench_storage", 10 ** 9, args.steps)
    study = study_mod.create(spec, url).study
    print(f"(b) storage time per trial (ms; mean / p95 over {args.measure_trials} trials, RandomSampler, "
          f"{args.steps} reports + should_prune (MedianPruner), heartbeat on), each size from a fresh storage")
    print(f"{'trials':>7s} {'ask':>11s} {f'{args.steps} reports':>11s} {f'{args.steps} prune chk':>11s} "
          f"{'tell':>11s} {'a+r+t':>13s} {'suggest':>11s} {'8 attrs':>11s} {'stale chk':>11s} {'budget chk':>11s} "
          f"{'COUNT(*)':>9s} {'1st chk':>8s} {'1st ask':>8s} {'open':>6s}")
    for size in (int(s) for s in args.sizes.split(",")):
        started = time.perf_counter()
        per_add = prefill(study, spec, size, args.templates, args.steps)
        fill_s = time.perf_counter() - started
        r = measure_storage(url, spec, args.measure_trials, args.steps)
        r["a+r+t"] = [sum(parts) for parts in zip(r["ask"], r["report"], r["prune"], r["tell"])]

        def cell(key, width=11):
            return f"{statistics.mean(r[key]):.1f}/{pct(r[key], 0.95):.1f}".rjust(width)

        added = f", add_trials {1000 * per_add:.0f} ms/trial" if per_add else ""
        print(f"{r['size']:7d} {cell('ask')} {cell('report')} {cell('prune')} {cell('tell')} {cell('a+r+t', 13)} "
              f"{cell('suggest')} {cell('attrs')} {cell('stale')} {cell('count')} "
              f"{statistics.mean(r['count_sql']):9.1f} {r['cold_count']:8.0f} {r['cold_ask']:8.0f} {r['open']:6.0f}"
              f"   (prefill {fill_s:.0f} s{added})", flush=True)
    print("a+r+t: ask + reports + should_prune calls + tell; targets <= 50 ms at 1,000 and <= 150 ms at 10,000 "
          "trials. budget chk: search.storage.count_trials as the library runs it (run_worker calls it 3x per "
          "trial, the objective once); COUNT(*): its COUNT query run directly on the RDBStorage behind Optuna's "
          "cache (equal to budget chk once count_trials finds that engine; see count_query). 1st chk, 1st ask: "
          "a fresh worker's first count_trials and first study.ask (which loads every trial into Optuna's cache). "
          "stale chk: fail_stale_trials, run by study.optimize before each trial when the heartbeat is on.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="PostgreSQL server and user (the database part is ignored)")
    parser.add_argument("--workers", default="1,2,4,8", help="worker process counts, the first is the baseline")
    parser.add_argument("--trials-per-worker", type=int, default=4, help="study budget = workers x this")
    parser.add_argument("--trial-seconds", type=float, default=5.0, help="sleep per trial, spread over --steps")
    parser.add_argument("--steps", type=int, default=5, help="reports (epochs) per trial")
    parser.add_argument("--sizes", default="1000,10000", help="study sizes for the per-trial storage time")
    parser.add_argument("--measure-trials", type=int, default=20, help="timed trials per size")
    parser.add_argument("--templates", type=int, default=30, help="prefill trials written with study.add_trials")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-storage", action="store_true")
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # (b) times ask/report/tell one by one, so it cannot go through optimize(); the storage is still the worker's.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    total = time.perf_counter()
    with scratch_databases(args.url) as make_db:
        if not args.skip_scaling:
            print_scaling(args, make_db)
        if not args.skip_storage:
            print_storage(args, make_db)
    print(f"total {time.perf_counter() - total:.0f} s; shared 2-core machine, timings are noisy")


if __name__ == "__main__":
    main()
