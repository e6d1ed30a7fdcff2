"""Objectives as data: what a study optimises, in which direction, and the one ranking of trials.

A study holds a tuple of `Objective`s: one learned metric (validation accuracy or loss, known
after training), and in a multi-objective study static ones too (parameter count, MACs per
image, latency per image: known before training, see search/costs.py). Every command that says
which trial is best (`status`, `best`, `export`, `report`, the final stage) asks `ranked` or
`best`, so they can never disagree: one objective ranks by value; several give the Pareto front
(`pareto_front`), ordered by the learned objective.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from optuna.trial import FrozenTrial, TrialState

from search.errors import ExportError, SpecError

# Every metric a study can optimise and the one direction it is optimised in.
METRICS = {"val_acc": "maximize", "val_loss": "minimize",
           "n_params": "minimize", "macs": "minimize", "latency_ms": "minimize"}
LEARNED = ("val_acc", "val_loss")  # reported after every epoch
STATIC = ("n_params", "macs", "latency_ms")  # known before training
DIRECTIONS = ("maximize", "minimize")
# The per-trial constraint each static metric's study key sets (`study.max_macs = 3e6`).
LIMITS = {"max_params": "n_params", "max_macs": "macs", "max_latency_ms": "latency_ms"}
# What an infeasible (untrained) trial records as its learned value: the worst there is, finite.
WORST = {"val_acc": 0.0, "val_loss": 1e9}


@dataclass(frozen=True)
class Objective:
    """One thing a study optimises: a metric name and its direction."""

    name: str  # a key of METRICS
    direction: str  # "maximize" | "minimize"

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def learned(self) -> bool:
        return self.name in LEARNED

    def best_of(self, values: Iterable[float]) -> float:
        """The best of `values` in this objective's direction (a trial's value over its epochs)."""
        return max(values) if self.maximize else min(values)


def objective(metric: object = "val_acc", direction: object = None) -> Objective:
    """The Objective a study file's `metric` and `direction` describe (a learned metric).

    Raises:
        SpecError: an unknown metric, or a direction that contradicts it (`study.<key>: ...`).
    """
    if not isinstance(metric, str) or metric not in LEARNED:
        raise SpecError(f"study.metric: expected one of {', '.join(LEARNED)}, got {metric!r}")
    wanted = METRICS[metric]
    if direction is not None and direction != wanted:
        raise SpecError(f"study.direction: {metric} is optimised with {wanted!r}, got {direction!r}")
    return Objective(metric, wanted)


def parse_objectives(names: object, directions: object = None) -> tuple[Objective, ...]:
    """The objectives a study file's `objectives = [...]` (and optional `directions = [...]`) name.

    Raises:
        SpecError: not a list of known metric names, a name twice, a direction that contradicts
            its metric or a list of directions of another length, no learned objective, or two.
    """
    if not isinstance(names, list) or not names:
        raise SpecError(f"study.objectives: expected a list of metric names, like [\"val_acc\", \"n_params\"], "
                        f"got {names!r}")
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in METRICS:
            raise SpecError(f"study.objectives[{i}]: unknown metric {name!r} (valid: {', '.join(METRICS)})")
        if name in names[:i]:
            raise SpecError(f"study.objectives[{i}]: {name} is already an objective")
    learned = [n for n in names if n in LEARNED]
    if len(learned) > 1:
        raise SpecError(f"study.objectives: {' and '.join(learned)} are both learned objectives; only one "
                        "learned objective (val_acc or val_loss) is supported")
    if not learned:
        raise SpecError(f"study.objectives: needs one learned objective (val_acc or val_loss) besides "
                        f"{', '.join(names)}")
    if directions is not None:
        if not isinstance(directions, list) or len(directions) != len(names):
            raise SpecError(f"study.directions: expected a list of {len(names)} directions, one per objective, "
                            f"got {directions!r}")
        for i, (name, direction) in enumerate(zip(names, directions)):
            if direction != METRICS[name]:
                raise SpecError(f"study.directions[{i}]: {name} is optimised with {METRICS[name]!r}, "
                                f"got {direction!r}")
    return tuple(Objective(n, METRICS[n]) for n in names)


def learned_value(trial: FrozenTrial, objectives: Sequence[Objective]) -> float | None:
    """The trial's value of the study's learned objective (None while it has no values)."""
    if trial.values is None:
        return None
    return trial.values[next(i for i, o in enumerate(objectives) if o.learned)]


def feasible(trial: FrozenTrial) -> bool:
    """False for a trial that broke a per-trial constraint (`constraints`, Optuna's: > 0 violated)."""
    return "infeasible" not in trial.user_attrs and all(c <= 0 for c in trial.user_attrs.get("constraints", ()))


def _dominates(a: Sequence[float], b: Sequence[float], objectives: Sequence[Objective]) -> bool:
    """a is at least as good as b in every objective and better in one."""
    signs = [1 if o.maximize else -1 for o in objectives]
    better = [s * x >= s * y for s, x, y in zip(signs, a, b)]
    return all(better) and any(s * x > s * y for s, x, y in zip(signs, a, b))


def pareto_front(trials: Iterable[FrozenTrial], objectives: Sequence[Objective]) -> list[FrozenTrial]:
    """The feasible completed trials no other one dominates, best learned value first (ties: the
    earlier trial first). Trials with equal values are all on the front."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None
            and len(t.values) == len(objectives) and feasible(t)]
    front = [t for t in done if not any(_dominates(o.values, t.values, objectives) for o in done)]
    goal = next(o for o in objectives if o.learned)
    front.sort(key=lambda t: t.number)
    return sorted(front, key=lambda t: learned_value(t, objectives), reverse=goal.maximize)


def ranked(trials: Iterable[FrozenTrial], objectives: Sequence[Objective]) -> list[FrozenTrial]:
    """The completed trials, best first; ties keep trial order (the earlier trial ranks higher).

    Args:
        trials: any trials of the study (running, pruned and failed ones are left out).
        objectives: the study's objectives; with several, the ranking is the Pareto front
            (`pareto_front`): dominated and infeasible trials are left out too.
    """
    if len(objectives) > 1:
        return pareto_front(trials, objectives)
    goal = objectives[0]
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    done.sort(key=lambda t: t.number)
    return sorted(done, key=lambda t: t.value, reverse=goal.maximize)


def best(trials: Iterable[FrozenTrial], objectives: Sequence[Objective]) -> FrozenTrial | None:
    """The best completed trial (with several objectives: the front's best learned value), or None."""
    order = ranked(trials, objectives)
    return order[0] if order else None


SIZE_BAND = 2.0  # multi-objective pruning: peers are completed trials within this factor of a trial's n_params


def poor_for_its_size(value: float, epoch: int, n_params: int, trials: Iterable[FrozenTrial], goal: Objective,
                      min_peers: int) -> tuple[float, int] | None:
    """The pruning rule of multi-objective studies (Optuna forbids trial.report there): a trial's
    learned `value` at `epoch` against the same epoch of the `curve`s of the feasible completed
    trials of similar size (n_params within a factor SIZE_BAND either way), a median rule within
    a size band, so that a small network is not pruned for being less accurate than big ones.

    Returns:
        (the peers' median, how many peers) when `value` is worse than that median and there are
        at least `min_peers` peers (and one); else None: go on training.
    """
    peers = [t.user_attrs["curve"][epoch] for t in trials
             if t.state == TrialState.COMPLETE and feasible(t) and len(t.user_attrs.get("curve") or ()) > epoch
             and n_params / SIZE_BAND <= t.user_attrs.get("n_params", -1) <= n_params * SIZE_BAND]
    if len(peers) < max(1, min_peers):
        return None
    median = statistics.median(peers)
    worse = value < median if goal.maximize else value > median
    return (median, len(peers)) if worse else None


def metric_value(trial: FrozenTrial, objectives: Sequence[Objective], metric: str) -> float | None:
    """A trial's value of `metric`: its objective value, else the user attr it recorded."""
    names = [o.name for o in objectives]
    if metric in names and trial.values is not None:
        return trial.values[names.index(metric)]
    return trial.user_attrs.get(metric)


def knee(front: Sequence[FrozenTrial], objectives: Sequence[Objective]) -> FrozenTrial:
    """The front's knee: after normalising each objective to [0, 1], the point farthest from the
    line between the front's two extremes in the learned objective (its best and its worst)."""
    if len(front) <= 2:
        return front[0]
    columns = list(zip(*(t.values for t in front)))
    scaled = [[(v - min(c)) / (max(c) - min(c)) if max(c) > min(c) else 0.0 for v in c] for c in columns]
    points = [list(p) for p in zip(*scaled)]
    a, b = points[0], points[-1]  # the front is ordered by the learned objective
    ab = [y - x for x, y in zip(a, b)]
    length = math.sqrt(sum(d * d for d in ab)) or 1.0

    def distance(p: list[float]) -> float:
        ap = [y - x for x, y in zip(a, p)]
        along = sum(x * y for x, y in zip(ap, ab)) / length
        return math.sqrt(max(0.0, sum(d * d for d in ap) - along * along))

    return max(zip(front, points), key=lambda tp: distance(tp[1]))[0]


_PICK = re.compile(r"(max_\w+)\s*=\s*([0-9.eE+_-]+)")


def parse_pick(rule: object) -> tuple[str, float] | None:
    """A pick rule: None for "knee", else (static metric, limit) for "max_params=300000" (also
    max_macs, max_latency_ms).

    Raises:
        ValueError: neither, with what is wrong (the caller names where the rule came from).
    """
    if not isinstance(rule, str):
        raise ValueError(f"expected a string, knee or LIMIT=NUMBER, got {rule!r}")
    if rule.strip() == "knee":
        return None
    m = _PICK.fullmatch(rule.strip())
    if not m or m[1] not in LIMITS:
        raise ValueError(f"expected knee or LIMIT=NUMBER with LIMIT one of {', '.join(LIMITS)}, like max_params=300000")
    try:
        limit = float(m[2].replace("_", ""))
    except ValueError:
        raise ValueError(f"{m[2]!r} is not a number") from None
    return LIMITS[m[1]], limit


def pick(trials: Iterable[FrozenTrial], objectives: Sequence[Objective], rule: str,
         where: str | None = None) -> FrozenTrial:
    """The Pareto trial `rule` asks for: "knee" (see `knee`), or "max_params=300000" (also
    max_macs, max_latency_ms): the best learned value among the front's trials within it.
    `where` starts the error lines (default "--pick RULE").

    Raises:
        ExportError: a rule that is neither, a single-objective study, no Pareto trial yet, or no
            Pareto trial within the limit (the line names the nearest one).
    """
    where = where or f"--pick {rule}"
    if len(objectives) < 2:
        raise ExportError(f"{where}: study has one objective; --pick chooses from a multi-objective "
                          "study's Pareto front (use --rank or --trial)")
    try:
        parsed = parse_pick(rule)
    except ValueError as exc:
        raise ExportError(f"{where}: {exc}") from None
    front = pareto_front(trials, objectives)
    if not front:
        raise ExportError(f"{where}: the study has no feasible completed trial yet")
    if parsed is None:
        return knee(front, objectives)
    metric, limit = parsed
    having = [(t, metric_value(t, objectives, metric)) for t in front]
    having = [(t, v) for t, v in having if v is not None]
    if not having:
        raise ExportError(f"{where}: the study's trials have no {metric} recorded")
    within = [t for t, v in having if v <= limit]
    if not within:
        nearest, value = min(having, key=lambda tv: (tv[1], tv[0].number))
        raise ExportError(f"{where}: no Pareto trial has {metric} <= {fmt(limit)}; the smallest is "
                          f"trial {nearest.number} with {fmt(value)}")
    return within[0]  # the front is ordered by the learned objective


def no_larger(trial: FrozenTrial, than: FrozenTrial, objectives: Sequence[Objective]) -> bool:
    """`trial` is at most `than` in every static objective (no bigger, no slower): a final-stage
    finalist of a Pareto pick (search/finalstage.py) keeps what the pick promised."""
    pairs = [(a, b) for o, a, b in zip(objectives, trial.values or (), than.values or ()) if not o.learned]
    return trial.values is not None and all(a <= b for a, b in pairs)


def fmt(value: float) -> str:
    """A static metric as people read it: 35,658 (a count), 0.0123 (a latency)."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.4g}"
