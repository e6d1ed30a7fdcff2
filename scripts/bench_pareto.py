"""Multi-objective pruning (pruned when poor for its size) vs no pruning on the same study, in one process.

One multi-objective study (studies/digits_pareto.toml unless --study says otherwise) is run
twice per repeat with the same sampler seed, the same trial budget and epochs: (a) "size", with
the study's own pruner section, which in a multi-objective study turns on the size-band median
rule (`search.objectives.poor_for_its_size`, see search/objective.py), and (b) "none", with
pruner.name = "NopPruner". Each run is the real thing: `search.study.create` into a temp SQLite
file of its own and `search.worker.run_worker` (its budget loop, the objective, the sampler),
with trial checkpoints off in both. With --repeats R the runs alternate, size none size none,
repeat r using the sampler seed + r, so load on a shared machine falls on both alike.

Per run it prints trials complete / pruned / infeasible / diverged, epochs trained (the epochs
each trial timed: its `epoch_seconds`, else its `curve`), wall time, the Pareto front (size and
points) and the front's hypervolume, then the ratios size/none: epochs, wall time, hypervolume.

Hypervolume: every objective turned into one to minimise, in a space where the objectives are
comparable: val_acc as 1 - accuracy (reference 1, i.e. accuracy 0), val_loss as it is (reference:
the largest on any front + 0.1), a static objective (n_params, macs, latency_ms) as log10 of it
(reference: the largest log10 on any front of either run + 0.1 decade). One reference point for
all runs; computed with Optuna's `optuna._hypervolume.compute_hypervolume` (exact; its own 2-D
sweep below where that module is missing). For accuracy vs n_params the area is accuracy x decades.

With TPE the two runs draw the same trials until a pruning decision changes what the sampler
learns from: TPE puts a pruned trial among its worse ("above") trials, so the draws stay the same
while the pruned trials would have been there anyway (on digits_pareto, seed 0: trial 10 is the
first pruned, the runs part at trial 21); the output says where they part. Both runs finish the
same number of trials (the budget counts pruned trials too), so the hypervolume of "none" is also
given restricted to its first trials that fit in the epochs the pruning run trained (the same
epoch budget).

    .venv/bin/python scripts/bench_pareto.py
    .venv/bin/python scripts/bench_pareto.py --trials 12 --set fixed.epochs=4 --repeats 2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search import spec as spec_mod
from search import study as study_mod
from search import worker
from search.objectives import STATIC, feasible, pareto_front

from bench_pruning import add_run_args, quiet_setup, warm_up  # scripts/ is on sys.path: the script's own folder

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("size", "none")  # size first: A B A B
MARGIN = 0.1  # reference point beyond the worst front value (log10 decades for static objectives)


def build_specs(args) -> dict[str, spec_mod.StudySpec]:
    """The study with this run's overrides; one copy per variant, differing in the pruner only."""
    overrides = list(args.set or [])
    if args.trials is not None:
        overrides.append(f"study.n_trials={args.trials}")
    base = spec_mod.load_spec(args.study, overrides)
    if not base.multi:
        raise SystemExit(f"{args.study}: a single-objective study; scripts/bench_pruning.py compares pruners there")
    if base.pruner.name == "NopPruner":
        raise SystemExit(f"{args.study}: the study's pruner is NopPruner, so both runs would be unpruned; "
                         "--set pruner.name=MedianPruner")
    # No timeout (both runs finish the budget) and no final stage (the search is what is compared).
    base = dataclasses.replace(base, timeout=None, final=None)
    variants = {"size": base.pruner, "none": spec_mod.ClassSpec("NopPruner", {})}
    return {name: spec_mod.spec_from_dict(spec_mod.spec_to_dict(dataclasses.replace(base, pruner=p)),
                                          source=f"bench spec ({name})")
            for name, p in variants.items()}


def with_seed(spec: spec_mod.StudySpec, seed: int | None) -> spec_mod.StudySpec:
    if seed is None:
        return spec
    sampler = spec_mod.ClassSpec(spec.sampler.name, {**spec.sampler.kwargs, "seed": seed})
    return dataclasses.replace(spec, sampler=sampler)


def epochs_trained(trial: optuna.trial.FrozenTrial) -> int:
    """The epochs the objective timed (a pruned trial's last one included), plus the epoch a
    diverged trial stopped in (the engine hands that one to no hook). Infeasible: none."""
    seconds = trial.user_attrs.get("epoch_seconds")
    healthy = len(seconds) if seconds is not None else len(trial.user_attrs.get("curve") or ())
    return healthy + str(trial.user_attrs.get("stop_reason", "")).startswith("diverged")


def run_one(spec: spec_mod.StudySpec, folder: Path, device: str) -> dict:
    url = f"sqlite:///{folder / 'bench.db'}"
    study = study_mod.create(spec, url).study
    started = time.perf_counter()
    result = worker.run_worker(spec.name, url, device=device, worker_index=0, artifacts="off")
    wall = time.perf_counter() - started
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    reasons = [str(t.user_attrs.get("stop_reason", "")) for t in trials]
    return {"trials": trials, "spec": spec, "wall": wall, "stopped": result.stopped_because,
            "complete": sum(t.state == TrialState.COMPLETE and feasible(t) for t in trials),
            "infeasible": sum(r.startswith("infeasible") for r in reasons),
            "pruned": sum(r.startswith("pruned") for r in reasons),
            "rejected": sum(r.startswith("rejected") for r in reasons),
            "diverged": sum(r.startswith("diverged") for r in reasons),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
            "epochs": sum(epochs_trained(t) for t in trials),
            "train": sum(sum(t.user_attrs.get("epoch_seconds") or ()) for t in trials),  # the epochs' own seconds
            "pruned_numbers": [t.number for t, r in zip(trials, reasons) if r.startswith("pruned")],
            "pruned_at_end": sum(r.startswith(f"pruned after epoch {spec.fixed.get('epochs')}:") for r in reasons),
            "pruned_after": sorted(epochs_trained(t) for t, r in zip(trials, reasons) if r.startswith("pruned")),
            "front": pareto_front(trials, spec.objectives)}


def loss_point(values, objectives) -> list[float]:
    """A trial's values as losses in the normalised space (see the module docstring)."""
    out = []
    for o, v in zip(objectives, values):
        if o.name == "val_acc":
            out.append(1.0 - v)
        elif o.name in STATIC:
            out.append(math.log10(max(v, 1e-12)))
        else:
            out.append(v)
    return out


def reference_point(fronts, objectives) -> list[float]:
    points = [loss_point(t.values, objectives) for front in fronts for t in front]
    ref = []
    for i, o in enumerate(objectives):
        if o.name == "val_acc":
            ref.append(1.0)
        else:
            ref.append(max((p[i] for p in points), default=0.0) + MARGIN)
    return ref


def _hv_2d(points: list[list[float]], ref: list[float]) -> float:
    """Area dominated by `points` (minimised) up to `ref`: a sweep over the first coordinate."""
    area, best_y = 0.0, ref[1]
    for x, y in sorted(points):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def hypervolume(front, objectives, ref) -> float:
    import numpy as np

    points = [p for p in (loss_point(t.values, objectives) for t in front) if all(a < b for a, b in zip(p, ref))]
    if not points:
        return 0.0
    try:
        from optuna._hypervolume import compute_hypervolume
    except ImportError:  # a private module: where an Optuna release drops it, the 2-D sweep
        if len(ref) != 2:
            raise
        return _hv_2d(points, ref)
    return float(compute_hypervolume(np.asarray(points, dtype=float), np.asarray(ref, dtype=float)))


def within_epochs(trials, budget: int) -> list:
    """The first trials (by number) whose epochs, summed, fit in `budget`."""
    out, used = [], 0
    for t in trials:
        used += epochs_trained(t)
        if used > budget:
            break
        out.append(t)
    return out


def first_difference(a, b) -> int | None:
    """The first trial number at which the two runs drew different parameters (None: never)."""
    for x, y in zip(a, b):
        if x.params != y.params:
            return x.number
    return None


def show_front(front, objectives) -> str:
    names = [o.name for o in objectives]

    def one(t) -> str:
        parts = []
        for name, v in zip(names, t.values):
            parts.append(f"{100 * v:.1f}%" if name == "val_acc"
                         else f"{v:,.0f}" if float(v).is_integer() else f"{v:.4g}")
        return "/".join(parts)

    return ", ".join(one(t) for t in front)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(REPO / "studies" / "digits_pareto.toml"),
                        help="a multi-objective study file (its space, fixed values, sampler and pruner are kept)")
    parser.add_argument("--trials", type=int, default=None, help="trials per run (default: the study's n_trials)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override the study file, as `cnnsearch run --set` (section.key=value); repeatable")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of size + none; round r uses sampler seed + r")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (default: the study's)")
    add_run_args(parser)
    args = parser.parse_args()

    quiet_setup(args.threads)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    specs = build_specs(args)
    first = specs["size"]
    objectives = first.objectives
    seed0 = args.seed if args.seed is not None else first.sampler.kwargs.get("seed")
    n_train, n_val = warm_up(first, args.device)
    print(f"study {first.name} on {first.data.get('dataset')}: {n_train} training / {n_val} validation images; "
          f"objectives {', '.join(f'{o.name} ({o.direction})' for o in objectives)}; {first.n_trials} trials x "
          f"{first.fixed.get('epochs')} epochs; sampler {first.sampler.name}{first.sampler.kwargs}"
          f"{f', seed {seed0} + repeat' if seed0 is not None else ''}; device {args.device}, "
          f"{args.threads} torch thread(s); {args.repeats} repeat(s), runs alternating size, none")
    print(f"  size  {first.pruner.name}{first.pruner.kwargs}: multi-objective rule, pruned when worse than the median "
          f"of >= n_startup_trials completed trials within 2x its n_params, from step n_warmup_steps (0-based)")
    print("  none  NopPruner")
    print("The sampler seed is the same, but TPE conditions on earlier outcomes (it counts a pruned trial among "
          "the worse ones), so the two searches part once a pruning decision changes that: after that point the "
          "fronts differ by search path as well as by pruning.")

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    total = time.perf_counter()
    for r in range(args.repeats):
        seed = None if seed0 is None else seed0 + r
        for name in VARIANTS:
            with tempfile.TemporaryDirectory(prefix=f"bench_pareto_{name}_") as tmp:
                res = run_one(with_seed(specs[name], seed), Path(tmp), args.device)
            res["repeat"], res["seed"] = r, seed
            runs[name].append(res)
            print(f"\n[{r}] {name}: {res['complete']} complete, {res['pruned']} pruned, {res['infeasible']} "
                  f"infeasible, {res['diverged']} diverged, {res['rejected']} rejected, {res['failed']} failed; "
                  f"{res['epochs']} epochs; {res['wall']:.1f} s ({res['train']:.1f} s in epochs; {res['stopped']}); "
                  f"front of {len(res['front'])}", flush=True)
            if res["pruned_after"]:
                print(f"  pruned trials {res['pruned_numbers']}; epochs trained by each: {res['pruned_after']}")
            if res["pruned_at_end"]:
                print(f"  {res['pruned_at_end']} trial(s) pruned after their last epoch: fully trained, "
                      "result discarded (the rule also runs at step epochs-1)")

    # One reference point for every run: the worst front values of all of them.
    ref = reference_point([res["front"] for v in VARIANTS for res in runs[v]], objectives)
    ref_text = ", ".join(f"{o.name} accuracy 0" if o.name == "val_acc"
                         else f"{o.name} {'log10 ' if o.name in STATIC else ''}{x:.3f}"
                         for o, x in zip(objectives, ref))
    print(f"\nhypervolume reference point: {ref_text} (losses: 1 - val_acc, log10 of static objectives)")
    for r in range(args.repeats):
        a, b = runs["size"][r], runs["none"][r]
        for res in (a, b):
            res["hv"] = hypervolume(res["front"], objectives, ref)
        # The same budget for "none": its first trials that fit in the epochs the pruning run trained.
        same = within_epochs(b["trials"], a["epochs"])
        b["hv_same"] = hypervolume(pareto_front(same, objectives), objectives, ref)
        b["same_trials"], b["same_epochs"] = len(same), sum(epochs_trained(t) for t in same)
        part = first_difference(a["trials"], b["trials"])
        same_to = ("all trials" if part is None else f"trials 0-{part - 1}, then part at trial {part}" if part
                   else "no trial (they differ from trial 0)")
        print(f"[{r}] seed {a['seed']}: the two runs drew the same parameters for {same_to}")
        for name, res in (("size", a), ("none", b)):
            print(f"  {name:5s} front: {show_front(res['front'], objectives)}")
        print(f"  none restricted to its first {b['same_trials']} trials ({b['same_epochs']} epochs <= the "
              f"{a['epochs']} the pruning run trained): hypervolume {b['hv_same']:.4f} vs size {a['hv']:.4f}")

    print(f"\n{'run':9s} {'complete':>8s} {'pruned':>6s} {'infeas':>6s} {'epochs':>6s} {'wall s':>7s} "
          f"{'epoch s':>7s} {'front':>5s} {'hypervol':>8s} {'epochs/none':>11s} {'wall/none':>9s} "
          f"{'hv/none':>7s} {'hv/none@same-epochs':>19s}")
    for r in range(args.repeats):
        b = runs["none"][r]
        for name in VARIANTS:
            res = runs[name][r]
            ratios = ("", "", "", "")
            if name != "none":
                ratios = (f"{res['epochs'] / b['epochs']:.0%}", f"{res['wall'] / b['wall']:.0%}",
                          f"{res['hv'] / b['hv']:.0%}" if b["hv"] else "-",
                          f"{res['hv'] / b['hv_same']:.0%}" if b["hv_same"] else "-")
            print(f"[{r}] {name:5s} {res['complete']:8d} {res['pruned']:6d} {res['infeasible']:6d} {res['epochs']:6d} "
                  f"{res['wall']:7.1f} {res['train']:7.1f} {len(res['front']):5d} {res['hv']:8.4f} "
                  f"{ratios[0]:>11s} {ratios[1]:>9s} {ratios[2]:>7s} {ratios[3]:>19s}")

    sums = {v: {k: sum(res[k] for res in runs[v]) for k in ("epochs", "wall")} for v in VARIANTS}
    hv = {v: statistics.mean(res["hv"] for res in runs[v]) for v in VARIANTS}
    hv_same = statistics.mean(res["hv_same"] for res in runs["none"])
    epochs_pct = 100 * sums["size"]["epochs"] / sums["none"]["epochs"]
    wall_pct = 100 * sums["size"]["wall"] / sums["none"]["wall"]
    hv_pct = 100 * hv["size"] / hv["none"] if hv["none"] else math.nan
    same_pct = 100 * hv["size"] / hv_same if hv_same else math.nan
    print(f"\nover {args.repeats} repeat(s): epochs size/none {epochs_pct:.0f}%, wall size/none {wall_pct:.0f}%, "
          f"mean hypervolume size/none {hv_pct:.0f}% ({hv['size']:.4f} / {hv['none']:.4f}); against none cut to the "
          f"pruning run's epochs {same_pct:.0f}% ({hv_same:.4f}). Both runs finish {first.n_trials} trials (the budget "
          f"counts pruned ones), so none's first {first.n_trials} trials are the whole run; the equal-epoch cut is the "
          f"same-budget comparison. Wall time includes the sampler, storage and evaluation (column epoch s: the "
          f"epochs' own seconds, as the trials record them). Timings are on a shared machine and noisy. "
          f"Total {time.perf_counter() - total:.0f} s.")
    print(f"pareto pruning: epochs {epochs_pct:.0f}% of none, hypervolume {hv_pct:.0f}% of none "
          f"({first.n_trials} trials each)")


if __name__ == "__main__":
    main()
