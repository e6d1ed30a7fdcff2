"""The finalist protocol against Hyperband to the final budget: which picks the better final model?

Issue 15's failure: the winner of short trials can be a configuration that leads early and
stalls later (a high constant learning rate), so a search that only looks at the first epochs
hands back something that does worse at length. Two whole studies, each run as `cnnsearch run`
runs one (a worker on a SQLite file, search then final stage, nobody in the loop), on the same
base study, data and sampler seed:

- finalists: the present protocol. Trials of --short epochs, pruned by the study's own pruner;
  then the final stage: the --finalists best trials and the study's start trained --final-epochs
  epochs, the best on validation over --seeds seeds, the test split read once per seed.
- hyperband: the remedy. Trials of --final-epochs epochs pruned by Hyperband (min_resource 1,
  reduction factor 3), so the top rung has trained at the final budget; then the same final
  stage with 1 finalist and the start (a finalist carries its trial's run on where it can).

Both final stages train on the same data as the search (the study's subset; full_data off), so
a difference is the choice, not the data. For each round (sampler seed) it prints, per
protocol, the chosen trial, its test accuracy (mean over seeds), the epochs trained in all
(search + final stage) and the wall time; the rounds alternate the two protocols (A B A B ...).
Last: the median over rounds of hyperband's epochs and wall time as a ratio of the finalists',
and the mean difference of test accuracy in points.

    python scripts/bench_remedy.py --data-dir ../shared/datasets/mnist            # MNIST pooling
    python scripts/bench_remedy.py --study studies/digits_quick.toml --subset 0   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pruning import add_run_args, epochs_trained, quiet_setup  # noqa: E402

from search import finalstage  # noqa: E402
from search import spec as spec_mod  # noqa: E402
from search import study as study_mod  # noqa: E402
from search.worker import run_worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def protocol_specs(args, seed: int) -> dict[str, spec_mod.StudySpec]:
    """The two studies of one round: the base study with this run's data, budget and seed."""
    base = spec_mod.load_spec(args.study)
    data = dict(base.data)
    if args.data_dir:
        data["data_dir"] = args.data_dir
    if args.subset is not None:
        data.pop("subset", None)
        if args.subset > 0:
            data["subset"] = args.subset
    final = spec_mod.FinalSpec(finalists=args.finalists, epochs=args.final_epochs, full_data=False,
                               stretch_schedule=True, seeds=args.seeds, average_last=1, baseline=True)
    sampler = spec_mod.ClassSpec(base.sampler.name, {**base.sampler.kwargs, "seed": seed})
    common = dict(n_trials=args.trials, timeout=None, data=data, sampler=sampler)
    short = dataclasses.replace(base, name="finalists", fixed={**base.fixed, "epochs": args.short},
                                final=final, **common)
    hyperband = dataclasses.replace(
        base, name="hyperband", fixed={**base.fixed, "epochs": args.final_epochs},
        pruner=spec_mod.ClassSpec("HyperbandPruner", {"min_resource": 1, "max_resource": args.final_epochs,
                                                      "reduction_factor": 3}),
        final=dataclasses.replace(final, finalists=1), **common)
    # Round-trip through the validator so a bad flag fails here, as a study file would.
    return {s.name: spec_mod.spec_from_dict(spec_mod.spec_to_dict(s), source=f"bench spec ({s.name})")
            for s in (short, hyperband)}


def job_epochs(t: optuna.trial.FrozenTrial) -> int:
    """Epochs a final-stage job trained itself: none when it reused the chosen finalist's run,
    and not those of the search trial it carried on."""
    if "reused_from" in t.user_attrs:
        return 0
    carried = (t.user_attrs.get("continued_from") or {}).get("epoch", 0)
    return max(0, len(t.user_attrs.get("history", [])) - carried)


def run_protocol(spec: spec_mod.StudySpec, device: str, folder: Path) -> dict:
    url = f"sqlite:///{folder / spec.name}.db"
    study_mod.create(spec, url)
    started = time.perf_counter()
    result = run_worker(spec.name, url, device=device, worker_index=0, artifacts=str(folder / f"{spec.name}-files"))
    wall = time.perf_counter() - started
    study, spec = study_mod.load(spec.name, url, validate=False)
    res = finalstage.results(study, spec)
    child = finalstage.load_child(study)
    epochs = (sum(epochs_trained(t) for t in study.get_trials(deepcopy=False))
              + sum(job_epochs(t) for t in child.get_trials(deepcopy=False) if "job" in t.user_attrs))
    chosen = res["chosen"] if res else None
    return {"stopped": result.stopped_because, "test": res["test_mean"] if res else None,
            "std": res["test_std"] if res else None, "epochs": epochs, "wall": wall,
            "chosen": None if chosen is None else (f"trial {chosen['source_trial']}"
                                                   + (" (the start)" if chosen["baseline"] else "")),
            "params": None if chosen is None else chosen["params"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(REPO / "studies" / "mnist_pooling.toml"),
                        help="base study (its space, start, sampler and search pruner are kept)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--subset", type=int, default=5000,
                        help="training images for search and final stage (0: all); validation and test unaffected")
    parser.add_argument("--trials", type=int, default=10, help="search trials, the same for both protocols")
    parser.add_argument("--short", type=int, default=3, help="epochs of a finalists-protocol trial")
    parser.add_argument("--final-epochs", type=int, default=9,
                        help="the final budget; also Hyperband's max_resource (9: rungs at 1, 3, 9)")
    parser.add_argument("--finalists", type=int, default=2, help="finalists of the present protocol")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running both protocols")
    parser.add_argument("--first-round", type=int, default=0, help="the first round's sampler seed: rounds use "
                        "seeds F..F+R-1, so a later run adds rounds to an earlier one's (default 0)")
    add_run_args(parser)
    args = parser.parse_args()
    quiet_setup(args.threads)
    rows: list[dict[str, dict]] = []
    if args.rounds < 1 or args.first_round < 0:
        parser.error("--rounds must be >= 1 and --first-round >= 0")
    for seed in range(args.first_round, args.first_round + args.rounds):
        specs = protocol_specs(args, seed)
        order = list(specs) if seed % 2 == 0 else list(reversed(specs))  # A B, then B A
        row = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in order:
                row[name] = r = run_protocol(specs[name], args.device, Path(tmp))
                test = "no result" if r["test"] is None else f"test {r['test']:.2%}" + (
                    f" ± {r['std']:.2%}" if r["std"] is not None else "")
                print(f"round {seed} {name:>9}: {test}, chosen {r['chosen']}, {r['epochs']} epochs, "
                      f"{r['wall']:.0f} s ({r['stopped']}); {r['params']}", flush=True)
        rows.append(row)
    done = [r for r in rows if all(p["test"] is not None for p in r.values())]
    if not done:
        sys.exit("no round ended with a tested model in both protocols")
    epochs = statistics.median(r["hyperband"]["epochs"] / r["finalists"]["epochs"] for r in done)
    wall = statistics.median(r["hyperband"]["wall"] / r["finalists"]["wall"] for r in done)
    gain = statistics.fmean(100 * (r["hyperband"]["test"] - r["finalists"]["test"]) for r in done)
    print(f"remedy: hyperband to the final budget vs finalists over {len(done)} rounds: "
          f"epochs {epochs:.2f}x, wall {wall:.2f}x (medians), test {gain:+.2f} points (mean)")


if __name__ == "__main__":
    main()
