"""How long the read commands take: `status`, `best` and `list` on a small SQLite study.

Creates a study (a tiny synthetic spec, created the way `cnnsearch create` does) in a temporary
SQLite file and adds `--trials` finished trials with `optuna.trial.create_trial` (no training),
then runs each command as a subprocess (`python -m search.cli ...`, as a user would), `--rounds`
times, the commands alternated so that a busy moment on the machine hits all of them alike. It
prints each command's median, min and max wall time, and the heavy modules each command
imported (checked in `sys.modules` at exit by a small wrapper around the same command):

    .venv/bin/python scripts/bench_cli.py
    .venv/bin/python scripts/bench_cli.py --rounds 9 --trials 200

A read command on a small study should answer in about a second; torch, plotly, matplotlib,
optuna_dashboard and scikit-learn are for training, reports and the dashboard, not for these.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "plotly", "matplotlib", "optuna_dashboard", "sklearn", "scipy", "pandas",
         "PIL", "onnx", "onnxruntime")
COMMANDS = ("status", "best", "list")

STUDY = """
[study]
name = "{name}"
n_trials = {n_trials}

[data]
dataset = "synthetic"
data_options = {{ n = 400, classes = 3, size = 8, channels = 1 }}

[fixed]
model = "convnet"
epochs = 4
batch_size = 32
device = "cpu"
model_params = {{ channels = [4], padding = 1, fc = [8] }}

[space.lr]
type = "float"
low = 1e-4
high = 1e-1
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
kwargs = {{ seed = 0 }}
"""

# Run the CLI as `python -m search.cli` does, then write the heavy modules it loaded to a file.
WRAPPER = """
import atexit, runpy, sys
heavy, out = set(sys.argv[1].split(",")), sys.argv[2]
def _write():
    with open(out, "w") as f:
        f.write(",".join(sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in heavy})))
atexit.register(_write)
sys.argv = ["cnnsearch", *sys.argv[3:]]
runpy.run_module("search.cli", run_name="__main__", alter_sys=True)
"""


def make_study(folder: Path, name: str, trials: int) -> str:
    """A cnnsearch study with `trials` finished trials (a few pruned, one running); its URL."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState

    from search import spec as spec_mod
    from search import study as study_mod

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, n_trials=trials + 10))
    url = f"sqlite:///{folder / 'bench.db'}"
    study = study_mod.create(spec_mod.load_spec(path), url).study
    dists = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "optimizer": CategoricalDistribution(["sgd", "adam"]),
             "momentum": FloatDistribution(0.0, 0.95)}
    for i in range(trials):
        optimizer = ("sgd", "adam")[i % 2]
        params = {"lr": 10 ** (-4 + 3 * i / max(trials, 1)), "optimizer": optimizer}
        if optimizer == "sgd":
            params["momentum"] = 0.9
        curve = {step: 0.5 + 0.1 * step + 0.001 * i for step in range(4)}
        pruned = i % 5 == 4
        if pruned:
            curve = {0: curve[0], 1: curve[1]}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else curve[3], params=params,
            distributions={k: dists[k] for k in params}, intermediate_values=curve,
            user_attrs={"n_params": 1234, "stop_reason": "pruned" if pruned else "finished",
                        "device": "cpu", "host": "bench", "epoch_seconds": 0.5}))
    return url


def command(which: str, name: str, url: str) -> list[str]:
    return [which, *([] if which == "list" else [name]), "--storage", url]


def run_once(args: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cnnsearch {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return took


def heavy_modules(args: list[str], cwd: Path, env: dict, folder: Path) -> list[str]:
    out = folder / "modules.txt"
    done = subprocess.run([sys.executable, "-c", WRAPPER, ",".join(HEAVY), str(out), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"wrapped cnnsearch {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    text = out.read_text()
    out.unlink()
    return text.split(",") if text else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="finished trials in the study (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated (default status,best,list)")
    args = parser.parse_args()
    commands = [c for c in args.commands.split(",") if c]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("CNNSEARCH_STORAGE", None)
    env.pop("CNNSEARCH_STORAGE_FILE", None)
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as tmp:
        folder = Path(tmp)
        url = make_study(folder, "bench", args.trials)
        print(f"study 'bench': {args.trials} finished trials in {url}; {args.rounds} rounds, commands alternated")
        run_once(command(commands[0], "bench", url), folder, env)  # warm the file cache, compile .pyc files
        times: dict[str, list[float]] = {c: [] for c in commands}
        for _ in range(args.rounds):
            for c in commands:
                times[c].append(run_once(command(c, "bench", url), folder, env))
        print(f"{'command':<8} {'median':>8} {'min':>8} {'max':>8}  heavy modules imported")
        for c in commands:
            heavy = heavy_modules(command(c, "bench", url), folder, env, folder)
            t = times[c]
            print(f"{c:<8} {statistics.median(t):>7.2f}s {min(t):>7.2f}s {max(t):>7.2f}s  "
                  f"{', '.join(heavy) or 'none'}")
        bare = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], capture_output=True)
            bare.append(time.perf_counter() - start)
        print(f"(the interpreter alone, `python -c pass`: {statistics.median(bare):.2f}s here)")


if __name__ == "__main__":
    main()
