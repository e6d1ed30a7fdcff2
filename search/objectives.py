"""Objectives as data: what a study optimises, in which direction, and the one ranking of trials.

A study holds a tuple of `Objective`s. Today a study has one (its `metric` and `direction` in
the study file); every command that says which trial is best (`status`, `best`, `export`,
`report`, the final stage) asks `ranked` or `best`, so they can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from optuna.trial import FrozenTrial, TrialState

from search.errors import SpecError

# Learned metrics a trial reports after every epoch, and the direction each is optimised in.
METRICS = {"val_acc": "maximize", "val_loss": "minimize"}
DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class Objective:
    """One thing a study optimises: a metric name and its direction."""

    name: str  # a key of METRICS
    direction: str  # "maximize" | "minimize"

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def best_of(self, values: Iterable[float]) -> float:
        """The best of `values` in this objective's direction (a trial's value over its epochs)."""
        return max(values) if self.maximize else min(values)


def objective(metric: object = "val_acc", direction: object = None) -> Objective:
    """The Objective a study file's `metric` and `direction` describe.

    Raises:
        SpecError: an unknown metric, or a direction that contradicts it (`study.<key>: ...`).
    """
    if not isinstance(metric, str) or metric not in METRICS:
        raise SpecError(f"study.metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    wanted = METRICS[metric]
    if direction is not None and direction != wanted:
        raise SpecError(f"study.direction: {metric} is optimised with {wanted!r}, got {direction!r}")
    return Objective(metric, wanted)


def ranked(trials: Iterable[FrozenTrial], objectives: Sequence[Objective]) -> list[FrozenTrial]:
    """The completed trials, best first; ties keep trial order (the earlier trial ranks higher).

    Args:
        trials: any trials of the study (running, pruned and failed ones are left out).
        objectives: the study's objectives; one for now (the multi-objective Pareto ranking
            will extend this function, not add another).
    """
    if len(objectives) != 1:
        raise NotImplementedError(f"ranking by {len(objectives)} objectives")
    goal = objectives[0]
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    done.sort(key=lambda t: t.number)
    return sorted(done, key=lambda t: t.value, reverse=goal.maximize)


def best(trials: Iterable[FrozenTrial], objectives: Sequence[Objective]) -> FrozenTrial | None:
    """The best completed trial, or None when no trial has completed."""
    order = ranked(trials, objectives)
    return order[0] if order else None
