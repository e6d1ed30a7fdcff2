"""How fast a study trains on its workers, and what is left of it at that pace (`cnnsearch status`).

The pace is measured, never assumed: training images a second of one worker, over the study's
finished search trials and final-stage jobs, from each one's start to its end (loading data,
validation, checkpoints and the test included: what a trial costs, not only its epochs; on 8x8
digits the epochs alone were a fifth of it, scripts/check_pace.py). The same six-conv CIFAR
study trained 3x slower on a CPU without bf16 in hardware than on one with it (docs/results.md),
so a budget sized on one machine says little on another: `status` tells it before the hours go.
Validation costs the same each epoch whatever the training images, so a pace taken on a small
search subset understates the final stage's: the time left is then an upper bound (2.79x on the
MNIST check in docs/results.md).

What is left: the search's trials not yet finished, each at the mean number of epochs the
finished ones trained (pruning included), and the final stage's jobs at its epochs on its
images, finalists first, then the chosen one's seed runs; each part shared among at most
`workers` at once. An estimate: a trial's speed varies with its batch size and width, and a
worker alone on free cores trains faster (search/cores.py).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

import optuna

TrialState = optuna.trial.TrialState
ENDED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class Projection:
    images_per_s: float  # one worker's training images a second, validation included
    epochs_measured: int  # the epochs that pace is taken over
    workers: int  # the work left is shared among this many at once, at most
    search_s: float  # seconds of search left (0: the search is done)
    final_s: float | None  # seconds of final stage left; None: the study has no [final]


def pace(records: Iterable[tuple[int | None, int, float | None]]) -> tuple[float, int] | None:
    """(images a second, epochs) over (training images an epoch, epochs, seconds) records, one a
    trial; None without a usable one. A trial that trained no epoch still took its seconds.

    >>> pace([(15000, 2, 310.0), (15000, 1, 160.0), (15000, 0, 30.0), (None, 3, 9.0)])
    (90.0, 3)
    """
    images = seconds = 0.0
    epochs = 0
    for n, done, secs in records:
        if n and secs:
            images, seconds, epochs = images + n * done, seconds + secs, epochs + done
    return (images / seconds, epochs) if images > 0 else None


def _wall(t: optuna.trial.FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def project(trials: Sequence[optuna.trial.FrozenTrial], spec, final: dict | None,
            workers: int | None = None) -> Projection | None:
    """What is left of a study at its measured pace; None before any search trial has finished.

    Args:
        trials: the study's search trials.
        spec: its `StudySpec`.
        final: `finalstage.results(...)` (None: the final stage has not started).
        workers: how many train at once; default: the trials running now, at least 1.
    """
    ended = [t for t in trials if t.state in ENDED]
    sized = [t for t in ended if t.user_attrs.get("train_images")]
    if not sized:
        return None
    # the epochs each trained itself: a retry's resumed epochs and a finalist's carried-on search
    # epochs are in its history but not in its seconds; a reused seed run trained nothing
    records = [(t.user_attrs["train_images"], len(t.user_attrs.get("epoch_seconds") or ())
                - t.user_attrs.get("resumed_from_epoch", 0), _wall(t)) for t in sized]
    for row in (final["all_finalists"] + final["seeds"]) if final else ():
        if row.get("reused_from") is None:
            carried = (row.get("continued_from") or {}).get("epoch", 0) + (row.get("resumed_from_epoch") or 0)
            records.append((row.get("train_images"), len(row["history"]) - carried, row["seconds"]))
    measured = pace(records)
    if measured is None:
        return None
    rate, epochs_measured = measured
    running = [t for t in trials if t.state == TrialState.RUNNING]
    final_running = [r for r in (final["all_finalists"] + final["seeds"]) if r["state"] == "RUNNING"] if final else []
    n = max(1, workers or len(running) + len(final_running))

    mean_epochs = statistics.fmean(len(t.user_attrs.get("epoch_seconds") or ()) for t in ended)
    search_images = statistics.fmean(t.user_attrs["train_images"] for t in sized)
    unstarted = max(spec.n_trials - len(ended) - len(running), 0)
    epochs_left = [mean_epochs] * unstarted + [max(mean_epochs - len(t.intermediate_values), 0) for t in running]
    search_s = _shared(epochs_left, search_images, rate, n)

    final_s = None
    if spec.final is not None:
        key = "train_images_all" if spec.final.full_data else "train_images"
        images = statistics.fmean(t.user_attrs.get(key) or t.user_attrs["train_images"] for t in sized)
        picks = max(1, len(spec.final.picks))
        per_job = spec.final.epochs
        if final is None:  # not started: every finalist (the starts may turn out to be among them)
            finalists = [per_job] * (spec.final.finalists * picks + len(spec.starts))
        else:
            finalists = [max((r["epochs"] or per_job) - r["epochs_done"], 0)
                         for r in final["all_finalists"] if r["state"] in ("RUNNING", "WAITING")]
        if final is None or final["chosen"] is None:  # the chosen one's own run is its first seed
            seeds = [per_job] * ((spec.final.seeds - 1) * picks)
        else:
            seeds = [max((r["epochs"] or per_job) - r["epochs_done"], 0)
                     for r in final["seeds"] if r["state"] in ("RUNNING", "WAITING")]
        final_s = 0.0 if final is not None and final["done"] else (
            _shared(finalists, images, rate, n) + _shared(seeds, images, rate, n))
    return Projection(rate, epochs_measured, n, search_s, final_s)


def _shared(epochs: list[float], images: float, rate: float, workers: int) -> float:
    """Seconds for jobs of these many epochs on `images` images each, at most `workers` at once."""
    jobs = sum(e > 0 for e in epochs)
    return sum(epochs) * images / rate / min(workers, jobs) if jobs else 0.0


def duration(seconds: float) -> str:
    """
    >>> duration(45), duration(1500), duration(27000)
    ('45 s', '25 min', '7.5 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def line(p: Projection) -> str:
    """One line for status: the pace and what is left at it."""
    parts = [f"search ~{duration(p.search_s)}" if p.search_s else "search done"]
    if p.final_s is not None:
        parts.append(f"final stage ~{duration(p.final_s)}" if p.final_s else "final stage done")
    return (f"pace: {p.images_per_s:.0f} training images/s a worker (over {p.epochs_measured} epochs); left at "
            f"that pace on {p.workers} worker{'s' if p.workers != 1 else ''}: {', '.join(parts)}")
