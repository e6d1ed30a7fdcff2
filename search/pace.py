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
most `workers` at once. While fewer jobs than workers are left in a part (the seed run after
the finalists, the search's last trial), each left running takes the idle workers' cores, and
goes as much faster as the study measured (`speedups`: the same job's epochs on more threads
against its epochs on launch's split); where no job has measured it, no faster: an upper bound.
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


def speedups(jobs: Iterable[Sequence[tuple[int | None, float]]]) -> dict[int, float]:
    """How much faster a job trains on m times launch's split of threads (the fewest any epoch
    had), for each m measured: per job, its mean epoch on the split over its mean epoch on m
    times it; the median over the jobs that trained on both. `jobs`: each job's (threads,
    training seconds) an epoch, threads None where not known (a GPU, a change mid-epoch).

    >>> speedups([[(1, 80.0), (2, 44.0), (2, 46.0)], [(1, 60.0), (2, 30.0)], [(1, 10.0)], [(None, 5.0)]])
    {2: 1.889}
    """
    jobs = [[(t, s) for t, s in job if t and s > 0] for job in jobs]
    known = [t for job in jobs for t, _ in job]
    if not known:
        return {}
    base = min(known)
    ratios: dict[int, list[float]] = {}
    for job in jobs:
        by: dict[int, list[float]] = {}
        for t, s in job:
            by.setdefault(t, []).append(s)
        if base in by:
            for t, secs in by.items():
                if t > base and t % base == 0:
                    ratios.setdefault(t // base, []).append(statistics.fmean(by[base]) / statistics.fmean(secs))
    return {m: round(statistics.median(r), 3) for m, r in sorted(ratios.items())}


def _paired(threads: list | None, seconds: list | None) -> list[tuple[int | None, float]]:
    """(threads, seconds) an epoch; threads None where not stored (a job stored before they were)."""
    seconds = seconds or []
    threads = list(threads or [])[:len(seconds)]
    return list(zip(threads + [None] * (len(seconds) - len(threads)), seconds))


def _epochs_of(t: optuna.trial.FrozenTrial) -> list[tuple[int | None, float]]:
    return _paired(t.user_attrs.get("epoch_threads"), t.user_attrs.get("epoch_train_seconds"))


def _epochs_of_row(row: dict) -> list[tuple[int | None, float]]:
    """A final job's (threads, training seconds) an epoch: a running one's as it trains, a
    finished one's from its history (a finalist's carried-on search epochs included: measured too)."""
    if row.get("history"):
        return [(h.get("threads"), h["train_seconds"]) for h in row["history"] if "train_seconds" in h]
    return _paired(row.get("epoch_threads"), row.get("epoch_train_seconds"))


def _wall(t: optuna.trial.FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def _on_split(pairs: Iterable[tuple[int | None, float]], faster: dict[int, float], base: int | None) -> float:
    """Training seconds as on launch's split of threads: an epoch on m times as many counts
    `faster[m]` times its seconds (as measured, where measured)."""
    return sum(sec * faster.get(th // base, 1.0) if th and base and th > base else sec for th, sec in pairs)


def _record(images: int | None, threads: list, train: list[float], seconds: float,
            wall: float | None, faster: dict[int, float], base: int | None) -> Record:
    """A job's Record, its epochs on more threads than launch's split counted as on the split."""
    raw = sum(train)
    more = _on_split(zip(threads, train), faster, base) - raw if len(threads) == len(train) else 0.0
    return Record(images, len(train), None if wall is None else wall + more, raw + more, seconds + more)


def _trial_record(t: optuna.trial.FrozenTrial, faster: dict[int, float] | None = None, base: int | None = None) -> Record:
    # the epochs it trained itself: a retry's resumed epochs are in its lists but not in its seconds
    a = t.user_attrs
    own = a.get("resumed_from_epoch", 0)
    seconds = (a.get("epoch_seconds") or [])[own:]
    train = a.get("epoch_train_seconds")
    if train is None:
        return Record(a["train_images"], len(seconds), _wall(t))
    return _record(a["train_images"], (a.get("epoch_threads") or [])[own:], train[own:][:len(seconds)],
                   sum(seconds), _wall(t), faster or {}, base)


def _final_record(row: dict, faster: dict[int, float] | None = None, base: int | None = None) -> Record:
    # a finalist's carried-on search epochs and a retry's resumed ones are in its history, not its seconds
    carried = (row.get("continued_from") or {}).get("epoch", 0) + (row.get("resumed_from_epoch") or 0)
    own = row["history"][carried:]
    if not all("train_seconds" in h and "seconds" in h for h in own):
        return Record(row.get("train_images"), len(own), row["seconds"])
    return _record(row.get("train_images"), [h.get("threads") for h in own], [h["train_seconds"] for h in own],
                   sum(h["seconds"] for h in own), row["seconds"], faster or {}, base)


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
    rows = (final["all_finalists"] + final["seeds"]) if final else []
    # a job that took an idle worker's cores trained faster than on launch's split: measured, and
    # its epochs counted as on the split, so that a job is sped up only where it will run alone
    by_job = [_epochs_of(t) for t in trials] + [_epochs_of_row(r) for r in rows if r.get("reused_from") is None]
    faster = speedups(by_job)
    known = [th for job in by_job for th, _ in job if th]
    base = min(known) if known else None
    records = [_trial_record(t, faster, base) for t in sized]
    # a final job trains its own configuration: a width-2 net at a third of a width-1 net's pace
    rates = {t.number: _rate(r) for t, r in zip(sized, records)}
    for row in rows:
        if row.get("reused_from") is None:  # a reused seed run trained nothing
            records.append(_final_record(row, faster, base))
    measured = pace(records, split)
    if measured is None:
        return None

    def now(epochs: list[tuple[int | None, float]]) -> int:
        """The multiple of launch's split a running job trains on now (its last epoch's threads)."""
        last = [th for th, _ in epochs[-RECENT:] if th]
        return max(1, last[-1] // base) if last and base else 1

    running = [t for t in trials if t.state == TrialState.RUNNING]
    final_running = [r for r in (final["all_finalists"] + final["seeds"]) if r["state"] == "RUNNING"] if final else []
    n = max(1, workers or len(running) + len(final_running))

    mean_epochs = statistics.fmean(len(t.user_attrs.get("epoch_seconds") or ()) for t in ended)
    search_images = statistics.fmean(t.user_attrs["train_images"] for t in sized)
    unstarted = max(spec.n_trials - len(ended) - len(running), 0)

    def at(seconds: float, m: int) -> tuple[float, int]:
        """A job timed at the study's pace (on launch's split), on m times the split's threads now."""
        return seconds / (faster.get(m, 1.0) if m > 1 else 1.0), m

    search = ([at(measured.job(mean_epochs - len(t.intermediate_values), search_images, started=True), now(_epochs_of(t)))
               for t in running if mean_epochs > len(t.intermediate_values)]
              + [(measured.job(mean_epochs, search_images), 1)] * unstarted)
    search_s = _shared(search, n, faster)

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
            epochs = _epochs_of_row(row)
            if epochs and epochs[-1][0]:  # threads known: the epochs on those it has now
                epochs = [e for e in epochs if e[0] == epochs[-1][0]]
            recent = [sec for _, sec in epochs[-RECENT:]]
            own = _rate(_final_record(row, faster, base) if row.get("history")
                        else Record(row.get("train_images"), len(recent), None, sum(recent)))
            source = by_number.get(row.get("chosen")) if row.get("source_trial") is None else None
            return own or (rate(source) if source else rates.get(row.get("source_trial")))

        def left(rows: list[dict]) -> list[tuple[float, int]]:
            """(seconds, the multiple of launch's split its pace was taken on) of each job left, running ones first."""
            going = sorted((r for r in rows if r["state"] in ("RUNNING", "WAITING")
                            and (r["epochs"] or per_job) > r["epochs_done"]), key=lambda r: r["state"] != "RUNNING")
            return [(measured.job((r["epochs"] or per_job) - r["epochs_done"], images, r["state"] == "RUNNING", rate(r)),
                     now(_epochs_of_row(r)) if r["state"] == "RUNNING" else 1) for r in going]

        if final is None:
            # not started: the finalists the search would give if it ended now, each at the pace its
            # trial measured; while fewer trials have completed than finalists are asked for, as
            # many more at the study's pace as the stage could add (the starts among them)
            from search.finalstage import finalist_jobs

            planned = finalist_jobs(list(trials), spec)[0]
            complete = sum(t.state == TrialState.COMPLETE for t in trials)
            more = (max(spec.final.finalists * picks + len(spec.starts) - len(planned), 0)
                    if complete < spec.final.finalists else 0)
            finalists = ([(measured.job(per_job, images, rate=rates.get(j["source_trial"])), 1) for j in planned]
                         + [(measured.job(per_job, images), 1)] * more)
            each = [f for f, _ in finalists]
        else:
            finalists = left(final["all_finalists"])
            each = [measured.job(per_job, images, rate=rate(r)) for r in by_number.values()]
        if final is None or final["chosen"] is None:  # the chosen one's own run is its first seed
            # which finalist it will be is not known yet: one at their mean time
            seeds = [(statistics.fmean(each) if each else measured.job(per_job, images), 1)] * ((spec.final.seeds - 1) * picks)
        else:
            seeds = left(final["seeds"])
        final_s = (0.0 if final is not None and final["done"]
                   else _shared(finalists, n, faster) + _shared(seeds, n, faster))
    return Projection(measured, n, search_s, final_s)


def _shared(jobs: list[tuple[float, int]], workers: int, faster: dict[int, float] | None = None) -> float:
    """Seconds for these jobs, in order, at most `workers` at once. Each is (seconds at the pace
    it was timed at, the multiple of launch's split of threads that pace was taken on). While k
    jobs run, each gets workers // k times the split (search/cores.py) and goes `faster[m]` times
    its pace on the split (1 where not measured), never slower than the pace it was timed at.

    >>> one = lambda *s: [(x, 1) for x in s]
    >>> _shared(one(10.0, 10.0, 10.0, 10.0), 2), _shared(one(30.0, 5.0, 5.0), 2), _shared([], 2)
    (20.0, 30.0, 0.0)
    >>> _shared(one(30.0, 5.0, 5.0), 2, {2: 2.0}), _shared([(30.0, 2)], 1, {2: 2.0})
    (20.0, 30.0)
    """
    faster = faster or {}

    def speed(m: int) -> float:
        return faster.get(m, 1.0) if m > 1 else 1.0

    waiting, running, elapsed = list(jobs), [], 0.0
    while waiting or running:
        while waiting and len(running) < workers:
            running.append(waiting.pop(0))
        m = max(1, workers // len(running))
        # never slower than it was timed: a job that took an idle worker's cores keeps them while
        # no more jobs run than ran then (`workers` is only how many train now, by default)
        rates = [speed(max(m, own)) / speed(own) for _, own in running]
        step = min(left / r for (left, _), r in zip(running, rates))
        elapsed += step
        running = [(left - step * r, own) for (left, own), r in zip(running, rates) if left - step * r > 1e-9]
    return elapsed


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
