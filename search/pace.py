"""How fast a study trains on its workers, and what is left of it at that pace (`cnnsearch status`).

The pace is measured, never assumed, over the study's finished search trials and final-stage
jobs, in three parts, since a job's size moves them apart: training (images a second of one
worker), validation (seconds an epoch: the same validation split whatever the training images)
and what a job costs besides its epochs (loading data, building the model, the test). Taken as
one rate over whole jobs, the time left on the MNIST check in docs/results.md came out 2.79x
too long: 3,000-image search trials spent as long validating as training, 54,000-image final
runs did not. The same six-conv CIFAR study trained 3x slower on a CPU without bf16 in hardware
than on one with it, so a budget sized on one machine says little on another: `status` tells it
before the hours go.

What is left: the search's trials not yet finished, each at the mean number of epochs the
finished ones trained (pruning included), at the study's pace, and the final stage's jobs at
its epochs on its images, finalists first (before the stage starts, those the search would give
if it ended now), then the chosen one's seed runs, each at the pace of the search trial whose
configuration it trains (width and batch size move it 3x), a running one at its last epochs'
(a worker whose neighbour waits takes its core: search/cores.py); each part shared among at
most `workers` at once. An estimate: a job not yet started is timed at its trial's pace even
where it will run alone on both cores.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

import optuna

TrialState = optuna.trial.TrialState
ENDED = (TrialState.COMPLETE, TrialState.PRUNED)
# A running final job is timed by its last epochs: a worker whose neighbour waits takes its core
# after an epoch (search/cores.py), so its first epoch is slower than the rest (1.7x here).
RECENT = 3


@dataclass(frozen=True)
class Record:
    """One finished job's measurements, counting only the epochs it trained itself."""
    images: int | None  # training images an epoch
    epochs: int  # epochs it trained
    wall_s: float | None  # its start to its end
    train_s: float | None = None  # the training part of those epochs (None: stored before it was)
    epoch_s: float | None = None  # those epochs in all, validation included


@dataclass(frozen=True)
class Pace:
    images_per_s: float  # one worker's training images a second
    val_s: float  # validation seconds an epoch
    other_s: float  # seconds a job costs besides its epochs
    epochs: int  # the epochs that pace is taken over

    def job(self, epochs: float, images: float, started: bool = False, rate: float | None = None) -> float:
        """Seconds for `epochs` epochs on `images` training images, at `rate` images a second where
        its configuration measured one (default: the study's pace); a job not yet `started` also
        pays its costs besides the epochs."""
        return epochs * (images / (rate or self.images_per_s) + self.val_s) + (0.0 if started else self.other_s)


def _rate(r: Record) -> float | None:
    """The training images a second one job measured, if it trained."""
    return r.images * r.epochs / r.train_s if r.images and r.epochs and r.train_s else None


@dataclass(frozen=True)
class Projection:
    pace: Pace
    workers: int  # the work left is shared among this many at once, at most
    search_s: float  # seconds of search left (0: the search is done)
    final_s: float | None  # seconds of final stage left; None: the study has no [final]


def pace(records: Iterable[Record], split: bool = True) -> Pace | None:
    """The pace over these jobs; None without a usable one. Jobs stored before epochs kept their
    training seconds count whole as training, as long as no job has them; so do all jobs with
    `split` False (one rate over whole jobs: what status printed before, for scripts/check_pace.py).

    >>> pace([Record(15000, 2, 320.0, 200.0, 300.0), Record(15000, 1, 160.0, 100.0, 150.0),
    ...       Record(15000, 0, 30.0, 0.0, 0.0), Record(None, 3, 9.0)])
    Pace(images_per_s=150.0, val_s=50.0, other_s=20.0, epochs=3)
    >>> pace([Record(15000, 2, 310.0), Record(15000, 1, 140.0)])
    Pace(images_per_s=100.0, val_s=0.0, other_s=0.0, epochs=3)
    """
    usable = [r for r in records if r.images and r.wall_s]
    timed = [r for r in usable if r.train_s is not None and r.epoch_s is not None] if split else []
    if timed:
        images = sum(r.images * r.epochs for r in timed)
        train_s = sum(r.train_s for r in timed)
        if images <= 0 or train_s <= 0:
            return None
        epochs = sum(r.epochs for r in timed)
        val_s = sum(max(r.epoch_s - r.train_s, 0.0) for r in timed) / epochs
        other_s = statistics.fmean(max(r.wall_s - r.epoch_s, 0.0) for r in timed)
        return Pace(images / train_s, val_s, other_s, epochs)
    images = sum(r.images * r.epochs for r in usable)
    seconds = sum(r.wall_s for r in usable)
    return Pace(images / seconds, 0.0, 0.0, sum(r.epochs for r in usable)) if images > 0 else None


def _wall(t: optuna.trial.FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def _trial_record(t: optuna.trial.FrozenTrial) -> Record:
    # the epochs it trained itself: a retry's resumed epochs are in its lists but not in its seconds
    a = t.user_attrs
    own = a.get("resumed_from_epoch", 0)
    seconds = (a.get("epoch_seconds") or [])[own:]
    train = a.get("epoch_train_seconds")
    return Record(a["train_images"], len(seconds), _wall(t), sum(train[own:]) if train is not None else None,
                  sum(seconds) if train is not None else None)


def _final_record(row: dict) -> Record:
    # a finalist's carried-on search epochs and a retry's resumed ones are in its history, not its seconds
    carried = (row.get("continued_from") or {}).get("epoch", 0) + (row.get("resumed_from_epoch") or 0)
    own = row["history"][carried:]
    split = all("train_seconds" in h and "seconds" in h for h in own)
    return Record(row.get("train_images"), len(own), row["seconds"],
                  sum(h["train_seconds"] for h in own) if split else None,
                  sum(h["seconds"] for h in own) if split else None)


def project(trials: Sequence[optuna.trial.FrozenTrial], spec, final: dict | None,
            workers: int | None = None, split: bool = True) -> Projection | None:
    """What is left of a study at its measured pace; None before any search trial has finished.

    Args:
        trials: the study's search trials.
        spec: its `StudySpec`.
        final: `finalstage.results(...)` (None: the final stage has not started).
        workers: how many train at once; default: the trials running now, at least 1.
        split: training, validation and the rest timed apart (False: one rate over whole jobs).
    """
    ended = [t for t in trials if t.state in ENDED]
    sized = [t for t in ended if t.user_attrs.get("train_images")]
    if not sized:
        return None
    records = [_trial_record(t) for t in sized]
    # a final job trains its own configuration: a width-2 net at a third of a width-1 net's pace
    rates = {t.number: _rate(r) for t, r in zip(sized, records)}
    for row in (final["all_finalists"] + final["seeds"]) if final else ():
        if row.get("reused_from") is None:  # a reused seed run trained nothing
            records.append(_final_record(row))
    measured = pace(records, split)
    if measured is None:
        return None
    running = [t for t in trials if t.state == TrialState.RUNNING]
    final_running = [r for r in (final["all_finalists"] + final["seeds"]) if r["state"] == "RUNNING"] if final else []
    n = max(1, workers or len(running) + len(final_running))

    mean_epochs = statistics.fmean(len(t.user_attrs.get("epoch_seconds") or ()) for t in ended)
    search_images = statistics.fmean(t.user_attrs["train_images"] for t in sized)
    unstarted = max(spec.n_trials - len(ended) - len(running), 0)
    search = ([measured.job(mean_epochs, search_images)] * unstarted
              + [measured.job(mean_epochs - len(t.intermediate_values), search_images, started=True)
                 for t in running if mean_epochs > len(t.intermediate_values)])
    search_s = _shared(search, n)

    final_s = None
    if spec.final is not None:
        key = "train_images_all" if spec.final.full_data else "train_images"
        images = statistics.fmean(t.user_attrs.get(key) or t.user_attrs["train_images"] for t in sized)
        picks = max(1, len(spec.final.picks))
        per_job = spec.final.epochs

        by_number = {r["number"]: r for r in final["all_finalists"]} if final else {}

        def rate(row: dict) -> float | None:
            """Its own epochs' pace (a running job: its last RECENT epochs', on the threads it has now),
            else that of the search trial it trains (a seed run: its finalist's)."""
            recent = (row.get("epoch_train_seconds") or [])[-RECENT:]
            own = _rate(_final_record(row) if row.get("history")
                        else Record(row.get("train_images"), len(recent), None, sum(recent)))
            source = by_number.get(row.get("chosen")) if row.get("source_trial") is None else None
            return own or (rate(source) if source else rates.get(row.get("source_trial")))

        def left(rows: list[dict]) -> list[float]:
            return [measured.job((r["epochs"] or per_job) - r["epochs_done"], images, r["state"] == "RUNNING", rate(r))
                    for r in rows if r["state"] in ("RUNNING", "WAITING") and (r["epochs"] or per_job) > r["epochs_done"]]

        if final is None:
            # not started: the finalists the search would give if it ended now, each at the pace its
            # trial measured; while fewer trials have completed than finalists are asked for, as
            # many more at the study's pace as the stage could add (the starts among them)
            from search.finalstage import finalist_jobs

            planned = finalist_jobs(list(trials), spec)[0]
            complete = sum(t.state == TrialState.COMPLETE for t in trials)
            more = (max(spec.final.finalists * picks + len(spec.starts) - len(planned), 0)
                    if complete < spec.final.finalists else 0)
            finalists = ([measured.job(per_job, images, rate=rates.get(j["source_trial"])) for j in planned]
                         + [measured.job(per_job, images)] * more)
            each = finalists
        else:
            finalists = left(final["all_finalists"])
            each = [measured.job(per_job, images, rate=rate(r)) for r in by_number.values()]
        if final is None or final["chosen"] is None:  # the chosen one's own run is its first seed
            # which finalist it will be is not known yet: one at their mean time
            seeds = [statistics.fmean(each) if each else measured.job(per_job, images)] * ((spec.final.seeds - 1) * picks)
        else:
            seeds = left(final["seeds"])
        final_s = 0.0 if final is not None and final["done"] else _shared(finalists, n) + _shared(seeds, n)
    return Projection(measured, n, search_s, final_s)


def _shared(jobs: list[float], workers: int) -> float:
    """Seconds for jobs of these many seconds each, at most `workers` at once; a job is not
    shared, so never less than the longest.

    >>> _shared([10.0, 10.0, 10.0, 10.0], 2), _shared([30.0, 5.0, 5.0], 2), _shared([], 2)
    (20.0, 30.0, 0.0)
    """
    return max(sum(jobs) / min(workers, len(jobs)), max(jobs)) if jobs else 0.0


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
    m = p.pace
    besides = (f", validation {m.val_s:.1f} s an epoch, {duration(m.other_s)} a job besides"
               if m.val_s or m.other_s else "")
    return (f"pace: {m.images_per_s:.0f} training images/s a worker{besides} (over {m.epochs} epochs); left at "
            f"that pace on {p.workers} worker{'s' if p.workers != 1 else ''}: {', '.join(parts)}")
