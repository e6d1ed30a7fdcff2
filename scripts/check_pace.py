"""How good is the time left that `cnnsearch status` prints (search/pace.py)? Run a study to its end
and compare, at each look, what status said was left with what was left in fact.

Creates the study in a temporary SQLite file (`cnnsearch create`, --set overrides as given),
starts `cnnsearch launch --cpus WORKERS` on it, and every --every seconds asks `study.summary`
(what status prints) for its projection, search and final stage together, and beside it the
same projection at one rate over whole jobs (`split=False`: what status printed before training,
validation and the rest were timed apart). When the launch ends, prints each look: seconds since
the start, both projections, the seconds that were in fact left, and the ratios; then the median
ratios over the looks.

    .venv/bin/python scripts/check_pace.py studies/mnist_pooling.toml --workers 2 --every 20 \\
        --set data.data_dir=../shared/datasets/mnist --set study.n_trials=8 --set data.subset=5000 \\
        --set fixed.epochs=3 --set final.epochs=3 --set final.finalists=1 --set final.seeds=2

A study too long to run here again (CIFAR: hours) is checked from copies of its database taken
while it ran, DIR/<unix seconds>.db (`sqlite3 study.db ".backup DIR/$(date +%s).db"` every few
minutes), and the database at its end: --replay reads each copy as status would have then, with
the code checked out now, and takes the end from the last trial that finished.

    .venv/bin/python scripts/check_pace.py --replay runs/snaps --name NAME --storage sqlite:///study.db
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from search import pace
from search import study as study_mod

CLI = [str(Path(sys.executable).with_name("cnnsearch"))]  # the environment's own command


def look(name: str, url: str, workers: int) -> tuple[float, float, str] | None:
    """(seconds left as status says, at one rate over whole jobs, the pace in words), or None before any pace."""
    info = study_mod.summary(name, url, workers)
    p = info["projection"]
    if p is None:
        return None
    study, spec = study_mod.load(name, url, heartbeat_interval=None, validate=False)
    whole = pace.project(study.get_trials(deepcopy=False), spec, info["final"], workers, split=False)
    left, left_whole = (x.search_s + (x.final_s or 0.0) for x in (p, whole))
    m = p.pace
    return left, left_whole, (f"{m.images_per_s:.0f} images/s, validation {m.val_s:.1f} s an epoch, "
                              f"{m.other_s:.1f} s a job besides; whole jobs {whole.pace.images_per_s:.0f} images/s")


def run(args) -> tuple[list[tuple[float, float, float, str]], float]:
    """Runs the study to its end, looking every --every seconds: (looks, seconds it took)."""
    with tempfile.TemporaryDirectory() as tmp:
        name = "pace_check"
        url = f"sqlite:///{tmp}/pace.db"
        sets = [x for s in [f"study.name={name}", *args.set] for x in ("--set", s)]
        subprocess.run([*CLI, "create", args.study, "--storage", url, *sets], check=True)
        start = time.monotonic()
        launch = subprocess.Popen([*CLI, "launch", name, "--storage", url, "--cpus", str(args.workers),
                                   "--log-dir", f"{tmp}/logs"], stdout=subprocess.DEVNULL)
        looks: list[tuple[float, float, float, str]] = []
        while launch.poll() is None:
            time.sleep(args.every)
            seen = look(name, url, args.workers)
            if seen is not None and launch.poll() is None:
                looks.append((time.monotonic() - start, *seen))
                print(f"  {looks[-1][0]:6.0f} s: status says {seen[0]:7.0f} s left, one rate {seen[1]:7.0f} s "
                      f"({seen[2]})", flush=True)
        end = time.monotonic() - start
        if launch.returncode != 0:
            sys.exit(f"launch exited with {launch.returncode}")
    return looks, end


def replay(args) -> tuple[list[tuple[float, float, float, str]], float]:
    """Each copy in --replay as status read it then: (looks, seconds the study took)."""
    path = args.storage.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:  # Optuna stores naive UTC times
        first, last = (datetime.fromisoformat(x).replace(tzinfo=timezone.utc).timestamp()
                       for x in db.execute("SELECT min(datetime_start), max(datetime_complete) FROM trials").fetchone())
    looks = []
    for snap in sorted(Path(args.replay).glob("*.db"), key=lambda p: float(p.stem)):
        seen = look(args.name, f"sqlite:///{snap}", args.workers)
        if seen is not None and float(snap.stem) < last:
            looks.append((float(snap.stem) - first, *seen))
    return looks, last - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", nargs="?", help="a study file (not with --replay)")
    parser.add_argument("--workers", type=int, default=2, help="launch --cpus N; with --replay, the workers it ran")
    parser.add_argument("--every", type=float, default=20.0, help="seconds between looks")
    parser.add_argument("--set", action="append", default=[], help="as for cnnsearch create")
    parser.add_argument("--replay", metavar="DIR", help="copies of a study's database taken while it ran")
    parser.add_argument("--name", help="with --replay: the study's name")
    parser.add_argument("--storage", help="with --replay: the study's database at its end (sqlite:///...)")
    args = parser.parse_args()
    if (args.replay is None) == (args.study is None):
        parser.error("give a study file, or --replay DIR with --name and --storage")
    if args.replay is not None and not (args.name and args.storage and args.storage.startswith("sqlite:///")):
        parser.error("--replay needs --name and --storage sqlite:///FILE")
    looks, end = replay(args) if args.replay else run(args)
    print(f"the study took {end:.0f} s (search and final stage, {args.workers} workers)")
    print(f"{'at':>8} {'was left':>9} {'status':>9} {'said/was':>9} {'one rate':>9} {'said/was':>9}")
    ratios, ratios_whole = [], []
    for at, said, said_whole, _ in looks:
        was = end - at
        ratios.append(said / was)
        ratios_whole.append(said_whole / was)
        print(f"{at:7.0f}s {was:8.0f}s {said:8.0f}s {ratios[-1]:8.2f}x {said_whole:8.0f}s {ratios_whole[-1]:8.2f}x")
    if ratios:
        print(f"median said/was over {len(ratios)} looks: status {statistics.median(ratios):.2f}x, "
              f"one rate over whole jobs {statistics.median(ratios_whole):.2f}x")


if __name__ == "__main__":
    main()
