"""trial -> RunConfig -> engine -> report/prune -> value, with what happened as trial attributes.

The optuna-examples idiom in one place: suggest, train an epoch, `trial.report(value, epoch)`
from step 0, `if trial.should_prune(): raise optuna.TrialPruned()`.

Epoch numbering: data counts from 0 (Optuna's steps, which a pruner's `n_warmup_steps` counts;
the metrics dicts' "epoch"; the best_epoch attr); text for people counts from 1 (CLI lines, stop
reasons such as "pruned after epoch 3": three epochs trained; curves.png's axis).
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Callable, Sequence

import optuna

import models
from search import costs, datasets, engine, finalstage, space
from search.artifacts import CheckpointStore, TrialCheckpoint
from search.errors import OverBudget, first_line
from search.objectives import WORST, poor_for_its_size
from search.storage import connection_problem, count_trials, stored_trial

EpochProgress = Callable[[int, int, dict], None]  # (trial number, epoch, metrics)


def make_objective(spec, *, device: str = "auto", on_epoch: EpochProgress | None = None,
                   trial_attrs: dict | None = None,
                   checkpoints: CheckpointStore | None = None) -> Callable[[optuna.Trial], float | Sequence[float]]:
    """The function a worker hands to `study.optimize`.

    A multi-objective study (`spec.multi`) returns one value per objective, in the spec's order;
    Optuna refuses `trial.report` there: the learning curve goes to the user attr `curve`
    instead, and a trial is pruned when it is poor for its size (`objectives.poor_for_its_size`).
    A trial over a per-trial limit (`spec.limits`: max_macs, max_latency_ms) is not trained:
    completed with the worst learned value and its static values in a multi-objective study,
    pruned in a single-objective one; either way with user attrs `infeasible` (why) and
    `constraints` (Optuna's: > 0 violated), which the sampler reads.

    Args:
        spec: the study's validated StudySpec.
        device: training device for this worker (auto | cpu | cuda | cuda:N).
        on_epoch: progress hook for the CLI, called after each reported epoch.
        trial_attrs: user attrs set on every trial before its parameters are drawn (the worker's
            worker_index and sampler_seed: what replays the draw).
        checkpoints: where trials save their checkpoint after each epoch (`search.artifacts`);
            a retry of a cut-off trial resumes from the original's last one. None: off.
    """
    goal = spec.learned
    metric = goal.name
    multi = spec.multi
    static = bool(spec.multi or spec.limits)  # costs measured before training (search/costs.py)
    # Multi-objective pruning (objectives.poor_for_its_size): on unless the pruner is NopPruner,
    # with MedianPruner's settings as the pruner section gives them.
    by_size = multi and spec.pruner.name != "NopPruner"
    min_peers = spec.pruner.kwargs.get("n_startup_trials", 5)
    warmup = spec.pruner.kwargs.get("n_warmup_steps", 0)

    def values_of(learned: float, measured: dict) -> tuple[float, ...]:
        return tuple(learned if o.learned else measured[o.name] for o in spec.objectives)

    def run_trial(trial: optuna.Trial, ckpt: TrialCheckpoint, replaced: list[int]) -> float:
        # A retry takes the slot of the trials it repeats, failed or about to be.
        earlier = count_trials(trial.study, below=trial.number, excluding=replaced,
                               states=("COMPLETE", "PRUNED", "RUNNING", "WAITING"))
        if earlier >= spec.n_trials:
            trial.set_user_attr("stop_reason", "over budget: another worker took the last slot")
            raise OverBudget(f"study budget of {spec.n_trials} trials already taken")
        epoch_seconds: list[float] = []
        train_seconds: list[float] = []  # the training part of each epoch's seconds (search/pace.py)
        threads: list[int | None] = []  # each epoch's CPU threads (None: a GPU, or changed mid-epoch)
        curve: list[float] = []

        def keep_seconds() -> None:
            trial.set_user_attr("epoch_seconds", epoch_seconds)
            trial.set_user_attr("epoch_train_seconds", train_seconds)
            trial.set_user_attr("epoch_threads", threads)

        def report(epoch: int, m: dict, save: bool = True) -> None:
            epoch_seconds.append(round(m["seconds"], 3))
            train_seconds.append(round(m.get("train_seconds", m["seconds"]), 3))
            threads.append(m.get("threads"))
            if multi:
                curve.append(m[metric])
                trial.set_user_attr("curve", curve)
            else:
                trial.report(m[metric], epoch)
            if save:  # what a retry resumes from; before on_epoch, where a deferred SIGTERM lands
                ckpt.save()
            if on_epoch is not None:
                on_epoch(trial.number, epoch, m)
            if not multi and trial.should_prune():
                keep_seconds()
                trial.set_user_attr("stop_reason", f"pruned after epoch {epoch + 1}")  # shown: from 1
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} at {metric} {m[metric]:.4f}")
            poor = by_size and warmup <= epoch < cfg.epochs - 1 and poor_for_its_size(  # a trained one is kept
                m[metric], epoch, measured["n_params"],
                trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), goal, min_peers)
            if poor:
                keep_seconds()
                why = (f"pruned after epoch {epoch + 1}: {metric} {m[metric]:.4f}, worse than the median "
                       f"{poor[0]:.4f} of {poor[1]} trials of similar size")
                trial.set_user_attr("stop_reason", why)
                raise optuna.TrialPruned(why)

        try:  # from the first suggest on: an error anywhere is this trial's crash, with its one line
            for key, value in (trial_attrs or {}).items():
                trial.set_user_attr(key, value)
            params = space.suggest_params(trial, spec)  # a sampler that cannot sample the space fails here
            cfg = space.params_to_config(spec, params).replace(device=device)
            resolved = engine.resolve_device(device)
            precision = "bf16" if engine.uses_bf16(cfg.precision, resolved) else "fp32"
            for key, value in (("host", socket.gethostname()), ("pid", os.getpid()),
                               ("device", str(resolved)), ("precision", precision)):
                trial.set_user_attr(key, value)
            started = time.perf_counter()
            dataset = datasets.dataset_for(cfg)
            # what `status` measures the pace on (search/pace.py): the images an epoch trains, and
            # the images a final stage on the whole training set would
            trial.set_user_attr("train_images", len(dataset.train_y))
            trial.set_user_attr("train_images_all", dataset.train_all)
            if static:
                measured = costs.static_values(spec, cfg, dataset.in_shape, dataset.num_classes, resolved)
                for key, value in measured.items():
                    trial.set_user_attr(key, value)
                if spec.limits:
                    constraints, why = costs.violations(spec, measured)
                    costs.record_constraints(trial, spec, constraints)
                    if why is not None:  # not trained: the sampler learns from the constraints
                        trial.set_user_attr("infeasible", why)
                        trial.set_user_attr("stop_reason", f"infeasible: {why}")
                        if not multi:
                            raise optuna.TrialPruned(f"infeasible: {why}")
                        return values_of(WORST[metric], measured)
            else:
                n_params = models.count_parameters(models.build_model(cfg, dataset.in_shape, dataset.num_classes))
                trial.set_user_attr("n_params", n_params)
            ds = datasets.to_device(dataset, resolved)
            state = ckpt.start(cfg, ds, resolved, replaced)  # a retry: from the cut-off original's last checkpoint
            for m in state.history:  # the epochs already done, to this trial once (pruner included)
                report(m["epoch"], m, save=False)
            result = engine.fit(cfg, report, dataset=dataset, state=state)
        except models.ModelConfigError as exc:
            # An architecture that cannot fit the input is a property of the space, not a crash.
            trial.set_user_attr("stop_reason", f"rejected: {exc}")
            raise optuna.TrialPruned(f"rejected: {exc}") from None
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            if connection_problem(exc) or isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
                raise  # the database, or another worker's stale check, not the trial: the worker settles it
            trial.set_user_attr("stop_reason", "crashed")
            trial.set_user_attr("error", first_line(exc, with_type=True))
            raise
        if len(result.history) > len(epoch_seconds):  # a diverged last epoch: not reported, trained all the same
            last = result.history[-1]
            epoch_seconds.append(round(last["seconds"], 3))
            train_seconds.append(round(last.get("train_seconds", last["seconds"]), 3))
            threads.append(last.get("threads"))
        keep_seconds()
        trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 3))
        trial.set_user_attr("stop_reason", result.stop_reason)
        if result.stop_reason != "finished":
            last = result.history[-1] if result.history else {}
            if not multi and math.isfinite(last.get(metric, math.nan)):
                trial.report(last[metric], last["epoch"])  # the diverged epoch shows on the curves too
            raise optuna.TrialPruned(result.stop_reason)
        trial.set_user_attr("best_epoch", result.best_epoch)
        learned = goal.best_of(h[metric] for h in result.history)
        if finalstage.keep_for_final(trial, spec, params, learned, checkpoints):
            ckpt.keep()  # a finalist of the final stage carries this run on (finalstage.continues)
        return values_of(learned, measured) if multi else learned

    def objective(trial: optuna.Trial) -> float:
        stored = stored_trial(trial)
        replaced = stored.system_attrs.get("retry_history", [])
        ckpt = TrialCheckpoint(trial, checkpoints, stored.user_attrs, replaced[0] if replaced else None)
        try:
            value = run_trial(trial, ckpt, replaced)
        except BaseException as exc:
            cut_off = (isinstance(exc, (KeyboardInterrupt, optuna.exceptions.UpdateFinishedTrialError))
                       or connection_problem(exc) is not None)
            if not cut_off:  # over: pruned, rejected, crashed; a cut-off trial's retry resumes from it
                ckpt.drop()
            raise
        ckpt.drop()
        return value

    return objective
