"""What a configuration costs before it is trained: parameters, MACs, latency; the per-trial limits.

The static objectives and constraints of a study (`study.objectives`, `max_macs`,
`max_latency_ms`; search/objectives.py) are measured here, by the objective, before any
training: parameters and multiply-accumulates per image on the meta device (`check.footprint`:
no memory, no time), latency for real on the worker's own device, and only when the study asks
for it. A trial over a limit is not trained (search/objective.py).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from search import check
from search.objectives import fmt

WARMUP_RUNS = 3  # untimed forward passes first: allocator, cuDNN autotuning, oneDNN primitives
TIMED_RUNS = 10  # the latency is the median of these
KEYS = {"macs": "max_macs", "latency_ms": "max_latency_ms"}  # each per-trial limit's study key


def measure_latency_ms(cfg: Any, in_shape: tuple[int, int, int], num_classes: int, device: Any,
                       batch: int) -> float:
    """Milliseconds per image: the model in eval mode on `device`, forward passes of a batch of
    `batch` random images, WARMUP_RUNS untimed, then the median of TIMED_RUNS, divided by `batch`.
    With `tta_flip` each image costs two passes, as it does in evaluation and predict."""
    import torch

    import models
    from search.engine import FlipAveraged

    model = models.build_model(cfg, in_shape, num_classes).to(device).eval()
    model = model.to(memory_format=torch.channels_last)  # as the engine trains it
    if cfg.tta_flip:
        model = FlipAveraged(model)
    x = torch.rand(batch, *in_shape, device=device).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for run in range(WARMUP_RUNS + TIMED_RUNS):
            sync()
            started = time.perf_counter()
            model(x)
            sync()
            if run >= WARMUP_RUNS:
                times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) / batch


def static_values(spec: Any, cfg: Any, in_shape: tuple[int, int, int], num_classes: int,
                  device: Any) -> dict[str, float]:
    """n_params and macs (meta device), and latency_ms when the study optimises or limits it.

    Raises:
        ModelConfigError: the model does not build or fit the input (the trial is rejected).
    """
    size = check.footprint(cfg, in_shape, num_classes)
    # macs per prediction: a test-time flip runs the network twice on every image
    values: dict[str, float] = {"n_params": size.params, "macs": size.macs * (2 if cfg.tta_flip else 1)}
    if "latency_ms" in [o.name for o in spec.objectives] or spec.max_latency_ms is not None:
        values["latency_ms"] = round(measure_latency_ms(cfg, in_shape, num_classes, device, spec.latency_batch), 6)
    return values


def violations(spec: Any, values: dict[str, float]) -> tuple[list[float], str | None]:
    """Optuna's constraint values for `spec.limits` (value - limit: > 0 violated, <= 0 kept), and
    one line saying which limits a trial broke (None: none)."""
    amounts = [float(values[metric] - limit) for metric, limit in spec.limits]
    broken = [f"{metric} {fmt(values[metric])} > study.{KEYS[metric]} = {fmt(limit)}"
              for (metric, limit), amount in zip(spec.limits, amounts) if amount > 0]
    return amounts, "; ".join(broken) or None


def record_constraints(trial: Any, spec: Any, amounts: list[float]) -> None:
    """The trial's constraint values where the sampler reads them: `Trial.set_constraint` (Optuna
    >= 5.0, one per limit, named by its study key), and the user attr `constraints`, which
    `objectives.feasible` reads and Optuna < 5 gets through the sampler's constraints_func."""
    trial.set_user_attr("constraints", amounts)
    if hasattr(trial, "set_constraint"):
        for (metric, _), amount in zip(spec.limits, amounts):
            trial.set_constraint(KEYS[metric], amount)

