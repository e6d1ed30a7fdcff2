"""The final stage of a study: finalists at the final budget, the chosen one over seeds, tested once.

When a study with a `[final]` section (`spec.FinalSpec`) has spent its search budget, its
workers go on here instead of stopping. The work is the trials of a child study,
`<name>.final`, in the same storage: a dot, which no study file's name may have, so it never
clashes with a user's study. It shows in optuna-dashboard as a study of its own, with its
learning curves, and the search's sampler never sees its long runs.

1. Finalists. The worker that creates the child study enqueues, once, the `final.finalists`
   best completed search trials, and the study's first `final.baseline` `[[enqueue]]` entries
   (the starts it was given: the hand-tuned one, say, and one with augmentation that short
   trials rank low) that are not among them, and each search finalist's twins: the same
   params with each of `final.variants`'s overrides (flip and padded crop, say: what short
   trials rank low is judged at the final budget). Each is trained at the final
   budget (`final_config`: final epochs, the whole training set, StepLR stretched to the new
   length) from the config's seed, without reading the test split. Its value is the validation
   metric averaged over its last `final.average_last` epochs.
2. The choice. Once no finalist is waiting or running, `choose` picks the best value (ties: the
   better search rank): a pure function of the stored finalists, so every worker agrees.
3. Seeds. The worker that claims the step (`storage.claim_numbered_attr`) enqueues `final.seeds`
   runs of the chosen config, seeds cfg.seed, cfg.seed + 1, ... The first is the chosen
   finalist's own run: its kept model file is tested, not trained again (retrained, to the same
   weights on a CPU, where no model file was kept). Each seed run reads the test split once, at
   its end. The model of the seed with the best validation value is the study's final model.
4. Results. `results` reads everything back from the child study for status, best, report and
   export (`export --model final.pt`).

A multi-objective study's finalists are taken from the Pareto front by `final.pick`. Given
several picks, each has its own finalists (a trial two picks share is one job, tagged with every
pick it serves), its own choice and its own seed runs; `results(pick=i)` is pick i's view, and
the first pick's is the study's own result.

Every job saves its `TrainState` after each epoch like a search trial (search/artifacts.py); a
job cut off by a killed worker is retried once and resumes from its last checkpoint. A finished
job keeps its model file (`<child>-model-trial<N>.pt`) in the artifact store; a finalist's is
removed once another finalist was chosen, so the store holds at most finalists + seeds files.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import optuna
from optuna.trial import TrialState

from search import config, objectives, space
from search.artifacts import CHECKPOINT_ATTR, trial_prefix
from search.errors import CheckpointError, ExportError, OverBudget, StudyError, first_line
from search.storage import UID_ATTR, claim_numbered_attr, connection_problem, storage_of, stored_trial

SUFFIX = ".final"
PARENT_ATTR = "parent_uid"  # child study user attr: the search study's uid, so a replaced study's old child is not reused
READY_ATTR = "finalists_enqueued"  # child study user attr, set last by its creator: the finalists are all there
SEEDS_CLAIM = "seed_plan:"  # claim_numbered_attr prefix: index 0 enqueues the seed runs
SEEDS_ATTR = "seeds_enqueued"  # child study user attr: the chosen finalist's trial number, once seeds are queued
RUNNING_EPOCHS_ATTR = "epoch_train_seconds"  # final job user attr: each epoch's training seconds as it trains
RUNNING_THREADS_ATTR = "epoch_threads"  # final job user attr: those epochs' CPU threads (None: GPU, or changed)
CHOSEN_ATTR = "chosen_per_pick"  # child study user attr: each pick's chosen finalist (trial number or None)
NOTES_ATTR = "notes"  # child study user attr: what the stage says to the user (fewer finalists than asked, ...)
KEPT_ATTR = "kept_for_final"  # search trial user attr: its last checkpoint stays for a finalist to carry on
if TYPE_CHECKING:  # the read side (results, status, report) loads no torch; training imports it lazily
    from search.artifacts import CheckpointStore, TrialCheckpoint

WAIT_FOR_CREATOR = 60.0  # seconds a worker waits for the child's creator to finish enqueueing


def _count(n: int, noun: str) -> str:
    """'1 finalist', '2 finalists': a count with its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def child_name(name: str) -> str:
    return f"{name}{SUFFIX}"


def final_config(spec, params: dict) -> config.RunConfig:
    """The search config of `params` at the final budget: `final.epochs` (default: the search's),
    the whole training set when `final.full_data`, and StepLR's step_size scaled by the ratio of
    the epochs when `final.stretch_schedule` (cosine and one-cycle follow `epochs` by themselves)."""
    cfg = space.params_to_config(spec, params)
    final = spec.final
    epochs = final.epochs or cfg.epochs
    changes: dict = {"epochs": epochs}
    if final.full_data:
        changes["subset"] = None
    if final.stretch_schedule and cfg.scheduler == "step" and epochs != cfg.epochs:
        changes["step_size"] = max(1, round(cfg.step_size * epochs / cfg.epochs))
    return cfg.replace(**changes)


def continues(spec, params: dict) -> bool:
    """Whether a finalist of the search trial with `params` carries on from that trial's last
    state instead of training again: its final config is the trial's but longer (same data, no
    stretched StepLR), and the schedule does not depend on the run's length (none or StepLR; a
    cosine or one-cycle run's early steps change with its length). Such a finalist ends exactly
    as one trained at the final budget from the start would, minus the epochs the trial trained.
    One objective only (a Pareto pick is known only when the search is over)."""
    if spec.final is None or spec.multi:
        return False
    trial_cfg = space.params_to_config(spec, params)
    final_cfg = final_config(spec, params)
    return (final_cfg.epochs >= trial_cfg.epochs and final_cfg.replace(epochs=trial_cfg.epochs) == trial_cfg
            and trial_cfg.scheduler in ("none", "step"))


def _is_start(params: dict, start: dict) -> bool:
    """A trial of the study's start: its [[enqueue]] entry's keys, the sampler's draws aside."""
    return all(k in params and params[k] == v for k, v in start.items())


def keep_for_final(trial: optuna.Trial, spec, params: dict, value: float, store: CheckpointStore | None) -> bool:
    """At a search trial's successful end: whether its last checkpoint stays for the final stage
    (`continues`), recorded as the user attr KEPT_ATTR. Kept: the starts', and those of the
    `final.finalists` best trials so far; a kept one that this trial pushes out of that rank is
    removed now, so the store holds at most finalists + starts of them until the final stage ends."""
    if store is None or not continues(spec, params):
        return False
    goal, k = spec.learned, spec.final.finalists
    starts = spec.starts

    def better(a: float, b: float) -> bool:
        return a > b if goal.maximize else a < b

    def the_start(p: dict) -> bool:
        return any(_is_start(p, start) for start in starts)

    done = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if sum(better(t.value, value) for t in done) >= k and not the_start(params):
        return False
    for t in done:
        if t.user_attrs.get(KEPT_ATTR) and t.user_attrs.get(CHECKPOINT_ATTR) and not the_start(t.params):
            if sum(better(o.value, t.value) for o in done) + better(value, t.value) >= k:
                store.remove(t.user_attrs[CHECKPOINT_ATTR])  # no finalist's any more
    trial.set_user_attr(KEPT_ATTR, True)
    return True


def job_value(history: list[dict], goal: objectives.Objective, last: int) -> float | None:
    """A job's value: `goal`'s metric averaged over the last `last` epochs of `history`."""
    values = [h[goal.name] for h in history[-last:] if goal.name in h]
    if not values or not all(math.isfinite(v) for v in values):
        return None
    return statistics.fmean(values)


def load_child(parent: optuna.Study) -> optuna.Study | None:
    try:
        child = optuna.load_study(study_name=child_name(parent.study_name), storage=storage_of(parent))
    except KeyError:
        return None
    return child


def _candidates(trials: list[optuna.trial.FrozenTrial], spec, rule: str | None) -> tuple[
        list[optuna.trial.FrozenTrial], optuna.trial.FrozenTrial | None, list[str]]:
    """(the trials the finalists are taken from, best first; the Pareto pick or None; notes).
    One objective (`rule` None): the completed trials. Several: the trial the pick `rule` chooses
    from the front, then the front's trials no larger than it (so a finalist keeps what the pick
    promised)."""
    if rule is None:
        return objectives.ranked(trials, spec.objectives), None, []
    try:
        picked = objectives.pick(trials, spec.objectives, rule, where=f"final.pick {rule}")
    except ExportError as exc:
        return [], None, [first_line(exc)]
    front = objectives.pareto_front(trials, spec.objectives)
    top = [t for t in front if objectives.no_larger(t, picked, spec.objectives)]
    values = ", ".join(f"{o.name} {objectives.fmt(v)}" for o, v in zip(spec.objectives, picked.values) if not o.learned)
    return top, picked, [f"final.pick {rule}: trial {picked.number} ({values}); finalists from it "
                         "and the Pareto front's trials no larger"]


def _start_job(trials: list[optuna.trial.FrozenTrial], spec, top: list[optuna.trial.FrozenTrial],
               picked: optuna.trial.FrozenTrial | None, index: int = 0) -> tuple[dict | None, str | None]:
    """The study's start [[enqueue]] `index + 1` as a finalist of one pick (or of the only
    choice), and a note: (job or None, note or None)."""
    start = spec.enqueue[index]
    which = f"the study's start ([[enqueue]] {index + 1}"
    # The start's own search trial (an [[enqueue]] entry may leave parameters to the sampler):
    # a completed one if any; its params, all of them, are what the finalist trains.
    same = [t for t in trials if _is_start(t.params, start)]
    done = [t for t in same if t.state == TrialState.COMPLETE and objectives.feasible(t)]
    own = (done or same or [None])[0]
    params = dict(own.params) if own is not None else dict(start)
    if picked is not None and not (done and objectives.no_larger(done[0], picked, spec.objectives)):
        why = "larger than the pick" if done else "no feasible completed search trial to size it by"
        return None, f"{which}) is not a finalist: {why}"
    source = own.number if own is not None else None
    rank = next((k for k, t in enumerate(top, 1) if t.number == source), None)
    note = (f"{which}, trial {source}) added as a finalist"
            + (f" (search rank {rank})" if rank else " (it did not complete in the search)"))
    return {"params": params, "rank": rank, "source_trial": source, "baseline": True}, note


def _with_twins(members: list[dict], variants: tuple[dict, ...]) -> list[dict]:
    """Search finalists each followed by its twins: its params with each of `variants`'s
    overrides (spec.FinalSpec.variants), where that changes them and gives no job already there.
    A twin keeps its source's trial and rank (a tie goes to the plain run, the earlier job); its
    user attr "variant" is the overrides. Next to its source, so that two workers train the pair
    side by side."""
    out: list[dict] = []
    for m in members:
        out.append(m)
        for overrides in variants:
            params = {**m["params"], **overrides}
            if all(params != o["params"] for o in [*members, *out]):
                out.append({**m, "params": params, "variant": dict(overrides)})
    return out


def _value_text(v) -> str:
    """A parameter value as a study file writes it: true, 4, 0.001."""
    return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


def label(row: dict) -> str:
    """What a final-stage job trains, for people: 'trial 9', 'trial 9 with flip=true, crop_padding=4'
    (a twin), 'the start'. `row`: a job of finalist_jobs, a row of results, or a job's user attrs."""
    source = row.get("source_trial")
    text = f"trial {source}" if source is not None else "the start"
    variant = row.get("variant")
    if variant:
        text += " with " + ", ".join(f"{k}={_value_text(v)}" for k, v in variant.items())
    return text


def finalist_jobs(trials: list[optuna.trial.FrozenTrial], spec) -> tuple[list[dict], list[str]]:
    """The finalist jobs (params, source trial, the picks they serve with their rank in each)
    that these search trials give, and notes for the user. With several picks a trial that two
    picks share is one job. While the search runs, the ones it would give if it ended now."""
    final = spec.final
    jobs: list[dict] = []
    notes: list[str] = []
    left_out: dict[str, list] = {}  # why the start is not a finalist -> the picks it is not one of
    several = len(final.picks) > 1
    for i, rule in enumerate(final.picks or (None,)):
        top, picked, more = _candidates(trials, spec, rule)
        notes += more
        if len(top) < final.finalists and (picked or rule is None):
            what = "Pareto trials no larger than the pick" if picked else "completed search trials"
            notes.append((f"final.pick {rule}: " if several else "") + f"{final.finalists} finalists asked for, "
                         f"{len(top)} {what}: {_count(len(top), 'finalist')}")
        members = [{"params": dict(t.params), "rank": k, "source_trial": t.number, "baseline": False}
                   for k, t in enumerate(top[:final.finalists], 1)]
        members = _with_twins(members, final.variants)
        for index in range(len(spec.starts) if picked or rule is None else 0):
            start, note = _start_job(trials, spec, top, picked, index)
            same = None if start is None else next((m for m in members if m["params"] == start["params"]), None)
            if same is not None:
                same["baseline"] = True
            elif start is None:
                left_out.setdefault(note, []).append(rule)
            else:
                members.append(start)
                if not any(j["params"] == start["params"] for j in jobs):
                    notes.append((f"final.pick {rule}: " if several else "") + note)
        for m in members:
            job = next((j for j in jobs if j["params"] == m["params"]), None)
            if job is None:
                job = {"params": m["params"], "rank": m["rank"], "source_trial": m["source_trial"],
                       "baseline": False, "picks": [], "pick_ranks": [], "variant": m.get("variant")}
                jobs.append(job)
                if job["variant"] is not None:
                    notes.append(f"{label(job)}: a twin of trial {job['source_trial']} (final.variants), "
                                 "added as a finalist")
            job["picks"].append(i)
            job["pick_ranks"].append(m["rank"])
            job["baseline"] = job["baseline"] or m["baseline"]
    for note, rules in left_out.items():  # one line, however many picks it is not a finalist of
        which = f" of {'pick' if len(rules) == 1 else 'picks'} {', '.join(rules)}" if several else ""
        notes.append(note.replace(" is not a finalist:", f" is not a finalist{which}:"))
    return jobs, notes


def pick_index(spec, rule: str) -> int | None:
    """Which of the final stage's picks `rule` is (the same limit, however written), or None."""
    try:
        wanted = objectives.parse_pick(rule)
    except ValueError:
        return None
    picks = spec.final.picks if spec.final is not None else ()
    return next((i for i, r in enumerate(picks) if objectives.parse_pick(r) == wanted), None)


def open_child(parent: optuna.Study, spec, uid: str | None) -> optuna.Study:
    """The child study of `parent`, created with its finalists by the first worker to get here.

    Raises:
        StudyError: no finalist at all (no completed search trial, no baseline), or the child's
            creator did not finish enqueueing within WAIT_FOR_CREATOR seconds.
    """
    name = child_name(parent.study_name)
    try:
        child = optuna.create_study(study_name=name, storage=storage_of(parent), direction=spec.direction)
    except optuna.exceptions.DuplicatedStudyError:
        child = optuna.load_study(study_name=name, storage=storage_of(parent))
        started = time.monotonic()
        while READY_ATTR not in child.user_attrs:
            if time.monotonic() - started > WAIT_FOR_CREATOR:
                raise StudyError(f"final stage {name!r}: its creator never finished enqueueing the finalists; "
                                 f"delete the study {name!r} (optuna delete-study) and start a worker again") from None
            time.sleep(0.5)
        return child
    jobs, notes = finalist_jobs(parent.get_trials(deepcopy=False), spec)
    if not jobs:
        child.set_user_attr(NOTES_ATTR, ["no completed search trial and no [[enqueue]] start: nothing to finalize"])
        child.set_user_attr(READY_ATTR, 0)
        return child
    child.set_user_attr(PARENT_ATTR, uid)
    child.set_user_attr(NOTES_ATTR, notes)
    child.set_user_attr("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for k, job in enumerate(jobs):
        attrs = {"role": "finalist", "job": f"finalist:{k}", "rank": job["rank"], "source_trial": job["source_trial"],
                 "baseline": job["baseline"], "picks": job["picks"], "pick_ranks": job["pick_ranks"]}
        if job["variant"] is not None:
            attrs["variant"] = job["variant"]
        child.enqueue_trial(job["params"], user_attrs=attrs)
    child.set_user_attr(READY_ATTR, len(jobs))
    return child


_STANDING = {TrialState.COMPLETE: 3, TrialState.RUNNING: 2, TrialState.WAITING: 2, TrialState.PRUNED: 1,
             TrialState.FAIL: 0}


def _latest(trials: list[optuna.trial.FrozenTrial], role: str) -> dict[str, optuna.trial.FrozenTrial]:
    """Per job key, the trial that stands for it: a completed one, else one running or waiting
    (a retry), else the latest (a retry replaces the trial it repeats)."""
    out: dict[str, optuna.trial.FrozenTrial] = {}
    for t in trials:
        if t.user_attrs.get("role") == role:
            held = out.get(t.user_attrs["job"])
            if held is None or (_STANDING[t.state], t.number) > (_STANDING[held.state], held.number):
                out[t.user_attrs["job"]] = t
    return out


RETRY_SECONDS = 30.0  # a job failed as stale gets its retry within moments; after this, none is coming


def _retry_coming(t: optuna.trial.FrozenTrial) -> bool:
    """A job failed by a dead worker's heartbeat (or a signal) a moment ago: the worker that
    failed it is queueing its retry (Optuna fails first, then calls the retry callback)."""
    from search.storage import RETRIES

    if t.state != TrialState.FAIL or "error" in t.user_attrs or t.user_attrs.get("stop_reason") == "crashed":
        return False
    if len(t.system_attrs.get("retry_history", [])) >= RETRIES or t.datetime_complete is None:
        return False
    return (datetime.now() - t.datetime_complete).total_seconds() < RETRY_SECONDS


def duplicate_of(trial: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial]) -> int | None:
    """Another trial doing this trial's job (two workers retried the same dead trial at once, as
    SQLite allows): the number of one that completed it, or an earlier one running it."""
    job = trial.user_attrs.get("job")
    for t in trials:
        if t.number == trial.number or t.user_attrs.get("job") != job:
            continue
        if t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < trial.number):
            return t.number
    return None


def _in_pick(t: optuna.trial.FrozenTrial, pick: int) -> bool:
    """Whether finalist `t` is one of pick `pick`'s (a job stored before several picks existed
    is one of the only pick's)."""
    return pick in t.user_attrs.get("picks", [0])


def _pick_rank(t: optuna.trial.FrozenTrial, pick: int) -> int | None:
    """Finalist `t`'s search rank within pick `pick` (None: the start, outside the ranked trials)."""
    attrs = t.user_attrs
    if "picks" not in attrs:
        return attrs.get("rank")
    return attrs["pick_ranks"][attrs["picks"].index(pick)]


def choose(child: optuna.Study, goal: objectives.Objective, pick: int = 0) -> optuna.trial.FrozenTrial | None:
    """The chosen finalist of pick `pick` (0: the only one of a single-objective study): the best
    value among its completed finalists; ties go to the better search rank (then the earlier job)."""
    done = [t for t in _latest(child.get_trials(deepcopy=False), "finalist").values()
            if t.state == TrialState.COMPLETE and t.value is not None and _in_pick(t, pick)]
    if not done:
        return None
    best = max(t.value for t in done) if goal.maximize else min(t.value for t in done)
    tied = [t for t in done if t.value == best]
    return min(tied, key=lambda t: (_pick_rank(t, pick) or math.inf, t.number))


def advance(child: optuna.Study, spec, store: CheckpointStore | None) -> str:
    """What a worker does next in the final stage: "work" (a job is waiting), "wait" (jobs run
    elsewhere, or another worker is queueing the seed runs) or "done". Queues the seed runs
    once no finalist is left to run."""
    trials = child.get_trials(deepcopy=False)
    finalists = _latest(trials, "finalist").values()
    if any(t.state == TrialState.WAITING for t in finalists):
        return "work"
    if any(t.state == TrialState.RUNNING or _retry_coming(t) for t in finalists):
        return "wait"
    if not finalists:
        return "done"
    attrs = child.user_attrs
    if SEEDS_ATTR not in attrs:
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        claims = [v for k, v in attrs.items() if k.startswith(SEEDS_CLAIM)]
        if claims and not _stale_claim(claims):
            return "wait"  # another worker is queueing them
        if not claims and claim_numbered_attr(child, SEEDS_CLAIM, holder) != 0:
            return "wait"
        # First, or taking over from a claimer that died before it finished: a seed run queued
        # twice is harmless, its second copy stops as a duplicate (`duplicate_of`).
        _enqueue_seeds(child, spec, store)
        trials = child.get_trials(deepcopy=False)
    seeds = _latest(trials, "seed").values()
    if any(t.state == TrialState.WAITING for t in seeds):
        return "work"
    if any(t.state == TrialState.RUNNING or _retry_coming(t) for t in seeds):
        return "wait"
    return "done"


def _stale_claim(claims: list[dict]) -> bool:
    """Whether the newest claim to queue the seed runs is older than WAIT_FOR_CREATOR seconds."""
    newest = max(datetime.fromisoformat(c["at"]) for c in claims)
    return (datetime.now(timezone.utc) - newest).total_seconds() > WAIT_FOR_CREATOR


def _parent(child: optuna.Study) -> optuna.Study:
    return optuna.load_study(study_name=child.study_name.removesuffix(SUFFIX), storage=storage_of(child))


def _drop_kept_states(child: optuna.Study, store: CheckpointStore | None) -> None:
    """Every finalist is done: the search trials' kept last states (keep_for_final) go."""
    if store is None:
        return
    parent = _parent(child)
    for t in parent.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get(KEPT_ATTR):
            # by the name prefix of the trial's line of retries, as TrialCheckpoint.drop would have
            first = (t.system_attrs.get("retry_history") or [t.number])[0]
            store.remove_all(trial_prefix(parent.study_name, first))


def _carry_on(trial: optuna.Trial, spec, params: dict, source: int | None, ckpt: TrialCheckpoint,
              store: CheckpointStore | None, ds, device) -> None:
    """A finalist whose search trial kept its last state (`keep_for_final`) carries that run on
    to the final budget instead of training it again: `ckpt.state` becomes the trial's state,
    made longer (user attr `continued_from`). A state that cannot be loaded: `carry_on_error`,
    and the finalist trains from the start."""
    from search import engine

    if store is None or source is None or not continues(spec, params):
        return
    t = next((t for t in _parent(trial.study).get_trials(deepcopy=False) if t.number == source), None)
    if t is None or not t.user_attrs.get(KEPT_ATTR) or not t.user_attrs.get(CHECKPOINT_ATTR):
        return
    if dict(t.params) != params:  # a twin (final.variants) trains its own way from the first epoch
        return
    state = ckpt.state  # fresh: nothing trained yet
    try:
        saved = store.load(t.user_attrs[CHECKPOINT_ATTR], f"search trial {source}'s last state")
        state.load_state_dict(saved["state"], longer=True)
    except Exception as exc:  # noqa: BLE001 - CheckpointError (gone, unreadable, another run's) or malformed
        trial.set_user_attr("carry_on_error", f"{first_line(exc, with_type=True)}; trained from the start")
        ckpt.state = engine.TrainState.start(state.cfg, ds, device)  # the load may have half-applied
        return
    trial.set_user_attr("continued_from", {"trial": source, "epoch": state.epoch})


def _enqueue_seeds(child: optuna.Study, spec, store: CheckpointStore | None) -> None:
    """Every finalist is done: each pick's chosen finalist is trained over the seeds (a finalist
    that two picks chose, once). CHOSEN_ATTR lists the chosen finalist of every pick, SEEDS_ATTR
    (set last: the seeds are queued) the first pick's."""
    _drop_kept_states(child, store)
    chosen = [choose(child, spec.learned, i) for i in range(max(1, len(spec.final.picks)))]
    if all(c is None for c in chosen):
        child.set_user_attr(NOTES_ATTR, [*child.user_attrs.get(NOTES_ATTR, []),
                                         "no finalist finished its final training: no seed runs"])
        child.set_user_attr(SEEDS_ATTR, None)
        return
    queued: set[int] = set()
    for c in chosen:
        if c is None or c.number in queued:
            continue
        queued.add(c.number)
        primary = chosen[0] is not None and c.number == chosen[0].number
        for k in range(spec.final.seeds):
            attrs = {"role": "seed", "job": f"seed:{k}" if primary else f"seed:{c.number}:{k}", "seed_index": k,
                     "chosen": c.number, "rank": c.user_attrs.get("rank"), "source_trial": c.user_attrs.get("source_trial")}
            if c.user_attrs.get("variant"):
                attrs["variant"] = c.user_attrs["variant"]
            if k == 0 and c.user_attrs.get("model"):
                attrs["reuse"] = c.number  # the chosen finalist's run is seed 0: tested, not retrained
            child.enqueue_trial(dict(c.params), user_attrs=attrs)
    child.set_user_attr(CHOSEN_ATTR, [None if c is None else c.number for c in chosen])
    child.set_user_attr(SEEDS_ATTR, None if chosen[0] is None else chosen[0].number)
    if store is not None:  # the models of finalists no pick chose are not needed any more
        for t in _latest(child.get_trials(deepcopy=False), "finalist").values():
            if t.number not in queued and t.user_attrs.get("model"):
                store.remove(t.user_attrs["model"])


def _model_id(child_study: str, number: int) -> str:
    return f"{child_study}-model-trial{number}.pt"


def _save_model(store: CheckpointStore, trial: optuna.Trial, model, cfg, ds) -> str:
    from search.modelfile import save_model_file

    with tempfile.TemporaryDirectory() as tmp:
        path = save_model_file(Path(tmp) / "model.pt", model, cfg, ds)
        data = path.read_bytes()
    return store.put_bytes(data, _model_id(trial.study.study_name, trial.number))


def _reused_test(store: CheckpointStore, artifact_id: str, ds, device, bf16: bool) -> tuple[float, float]:
    """(test loss, test acc) of a kept model file, on `ds`'s test split."""
    from search import engine
    from search.augment import Normalizer
    from search.modelfile import load_model_file

    data = store.get_bytes(artifact_id, "the chosen finalist's model")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        path.write_bytes(data)
        loaded = load_model_file(path, str(device))
    norm = Normalizer(ds.mean, ds.std, device)
    return engine.evaluate(loaded.model, ds.test_x, ds.test_y, norm, bf16=bf16, tta_flip=loaded.config.tta_flip)


def make_job(spec, *, device: str = "auto", on_epoch: Callable[[int, int, dict], None] | None = None,
             checkpoints: CheckpointStore | None = None) -> Callable[[optuna.Trial], float]:
    """The function a worker hands to the child study's `optimize`: one finalist or seed run."""
    import models
    from search import datasets, engine
    from search.artifacts import TrialCheckpoint

    goal = spec.learned
    metric, last = goal.name, spec.final.average_last

    def run_job(trial: optuna.Trial, attrs: dict, ckpt: TrialCheckpoint, replaced: list[int]) -> float:
        if "job" not in attrs:  # ask() made a new trial: another worker took the last waiting job
            trial.set_user_attr("stop_reason", "no final-stage job left: another worker took it")
            raise OverBudget("no final-stage job left")
        other = duplicate_of(stored_trial(trial), trial.study.get_trials(deepcopy=False))
        if other is not None:
            trial.set_user_attr("stop_reason", f"duplicate retry: trial {other} does this job")
            raise OverBudget(f"duplicate of trial {other}")
        params = space.suggest_params(trial, spec)  # the enqueued (fixed) params, recorded as a trial's
        cfg = final_config(spec, params)
        cfg = cfg.replace(device=device, seed=(cfg.seed + attrs.get("seed_index", 0)) % config.SEED_LIMIT)
        resolved = engine.resolve_device(device)
        bf16 = engine.uses_bf16(cfg.precision, resolved)
        for key, value in (("host", socket.gethostname()), ("pid", os.getpid()), ("device", str(resolved)),
                           ("precision", "bf16" if bf16 else "fp32"), ("epochs", cfg.epochs), ("seed", cfg.seed),
                           ("subset", cfg.subset)):
            trial.set_user_attr(key, value)
        started = time.perf_counter()
        dataset = datasets.dataset_for(cfg)
        trial.set_user_attr("train_images", len(dataset.train_y))  # for the pace (search/pace.py)
        ds = datasets.to_device(dataset, resolved)
        test = attrs["role"] == "seed"
        reuse = attrs.get("reuse")
        if reuse is not None and checkpoints is not None:
            source = child_trial(trial.study, reuse)
            try:
                loss, acc = _reused_test(checkpoints, source.user_attrs["model"], ds, resolved, bf16)
            except CheckpointError as exc:
                trial.set_user_attr("reuse_error", f"{first_line(exc)}; trained again")
            else:
                history = source.user_attrs.get("history", [])
                for m in history:
                    trial.report(m[metric], m["epoch"])
                for key in ("history", "n_params", "train_seconds", "stop_reason"):
                    if key in source.user_attrs:
                        trial.set_user_attr(key, source.user_attrs[key])
                trial.set_user_attr("model", source.user_attrs["model"])
                trial.set_user_attr("test_acc", acc)
                trial.set_user_attr("test_loss", loss)
                trial.set_user_attr("reused_from", reuse)
                return job_value(history, goal, last)
        trial.set_user_attr("n_params", models.count_parameters(models.build_model(cfg, ds.in_shape, ds.num_classes)))
        state = ckpt.start(cfg, ds, resolved, replaced)
        if attrs["role"] == "finalist" and state.epoch == 0:  # no run of its own to resume
            _carry_on(trial, spec, params, attrs.get("source_trial"), ckpt, checkpoints, ds, resolved)
            state = ckpt.state

        trained: list[float] = []  # the training seconds of each epoch this run trains (not resumed ones)
        threads: list[int | None] = []  # and the CPU threads each trained on (search/cores.py, search/pace.py)

        def report(epoch: int, m: dict, save: bool = True) -> None:
            if metric in m and math.isfinite(m[metric]):
                trial.report(m[metric], epoch)
            if save:
                ckpt.save()
                if "train_seconds" in m:  # while it runs, status times what is left by these (search/pace.py)
                    trained.append(round(m["train_seconds"], 3))
                    threads.append(m.get("threads"))
                    trial.set_user_attr(RUNNING_EPOCHS_ATTR, trained)
                    trial.set_user_attr(RUNNING_THREADS_ATTR, threads)
            if on_epoch is not None:
                on_epoch(trial.number, epoch, m)

        for m in state.history:
            report(m["epoch"], m, save=False)
        result = engine.fit(cfg, report, dataset=ds, evaluate_test=test, state=state)
        trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 3))
        trial.set_user_attr("stop_reason", result.stop_reason)
        trial.set_user_attr("history", [{k: v for k, v in h.items() if isinstance(v, (int, float))}
                                        for h in result.history])
        if result.stop_reason != "finished":
            raise optuna.TrialPruned(result.stop_reason)
        if test:
            trial.set_user_attr("test_acc", result.test_acc)
            trial.set_user_attr("test_loss", result.test_loss)
        if checkpoints is not None:
            try:
                trial.set_user_attr("model", _save_model(checkpoints, trial, result.model, cfg, dataset))
            except OSError as exc:
                trial.set_user_attr("model_error", f"model file not kept: {first_line(exc, with_type=True)}")
        value = job_value(result.history, goal, last)
        if value is None:
            raise optuna.TrialPruned(f"no finite {metric} in its last {last} epochs")
        return value

    def job(trial: optuna.Trial) -> float:
        stored = stored_trial(trial)
        replaced = stored.system_attrs.get("retry_history", [])
        ckpt = TrialCheckpoint(trial, checkpoints, stored.user_attrs, replaced[0] if replaced else None)
        try:
            value = run_job(trial, dict(stored.user_attrs), ckpt, replaced)
        except BaseException as exc:
            cut_off = (isinstance(exc, (KeyboardInterrupt, optuna.exceptions.UpdateFinishedTrialError))
                       or connection_problem(exc) is not None)
            if not cut_off:
                ckpt.drop()
                if isinstance(exc, Exception) and not isinstance(exc, (optuna.TrialPruned, OverBudget)):
                    trial.set_user_attr("stop_reason", "crashed")
                    trial.set_user_attr("error", first_line(exc, with_type=True))
            raise
        ckpt.drop()
        return value

    return job


def child_trial(child: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in child.get_trials(deepcopy=False) if t.number == number)


def results(parent: optuna.Study, spec, pick: int = 0) -> dict | None:
    """The final stage as stored, as seen by its pick `pick` (0: the study's own, or the only
    choice of a single-objective study): None when it has not started (or the study has no [final]).

    Keys: finalists (that pick's rows), chosen (its chosen finalist's row or None), seeds (rows),
    test_mean, test_std, model (artifact id of its final model: the seed with the best
    validation value), config (the chosen config at the final budget), pick (the rule, None with
    one objective), picks (one short entry per pick, the others' included: rule, chosen, n_params,
    test_mean, test_std, tested, model), all_finalists (every pick's rows), done, notes, wall_s
    (first job's start to last job's end), compute_s (every job's training seconds).
    """
    if spec.final is None:
        return None
    child = load_child(parent)
    if child is None:
        return None
    attrs = child.user_attrs
    if attrs.get(PARENT_ATTR) not in (None, parent.user_attrs.get(UID_ATTR)):
        return None  # an earlier study of this name's stage (should have been deleted with it)
    trials = child.get_trials(deepcopy=False)
    goal = spec.learned

    def row(t: optuna.trial.FrozenTrial) -> dict:
        a = t.user_attrs
        return {"number": t.number, "job": a.get("job"), "state": t.state.name, "value": t.value,
                "rank": a.get("rank"), "source_trial": a.get("source_trial"), "baseline": a.get("baseline", False),
                "seed": a.get("seed"), "test_acc": a.get("test_acc"), "n_params": a.get("n_params"),
                "seconds": a.get("train_seconds"), "stop_reason": a.get("stop_reason"), "error": a.get("error"),
                "model": a.get("model"), "epochs": a.get("epochs"), "history": a.get("history", []),
                "epochs_done": len(t.intermediate_values), "train_images": a.get("train_images"),
                "continued_from": a.get("continued_from"), "resumed_from_epoch": a.get("resumed_from_epoch"),
                "reused_from": a.get("reused_from"), "params": dict(t.params), "host": a.get("host"),
                "epoch_train_seconds": a.get(RUNNING_EPOCHS_ATTR, []), "variant": a.get("variant"),
                "epoch_threads": a.get(RUNNING_THREADS_ATTR, []),
                "device": a.get("device"), "chosen": a.get("chosen")}

    finalist_trials = list(_latest(trials, "finalist").values())
    all_finalists = [row(t) for t in finalist_trials]
    all_seeds = [row(t) for t in _latest(trials, "seed").values()]
    chosen_numbers = attrs.get(CHOSEN_ATTR, [attrs.get(SEEDS_ATTR)])  # a stage stored before several picks
    rules = spec.final.picks or (None,)

    def view(i: int) -> dict:
        finalists = [r for t, r in zip(finalist_trials, all_finalists) if _in_pick(t, i)]
        number = chosen_numbers[i] if SEEDS_ATTR in attrs and i < len(chosen_numbers) else None
        chosen = next((f for f in finalists if f["number"] == number), None)
        seeds = [s for s in all_seeds if s["chosen"] == number] if number is not None else []
        tests = [s["test_acc"] for s in seeds if s["state"] == "COMPLETE" and s["test_acc"] is not None]
        done_seeds = [s for s in seeds if s["state"] == "COMPLETE" and s["value"] is not None]
        model = None
        if done_seeds:
            best_value = (max if goal.maximize else min)(s["value"] for s in done_seeds)
            model = next(s["model"] for s in done_seeds if s["value"] == best_value)
        return {"finalists": finalists, "chosen": chosen, "seeds": seeds, "model": model, "pick": rules[i],
                "test_mean": statistics.fmean(tests) if tests else None,
                "test_std": statistics.stdev(tests) if len(tests) > 1 else None, "tested": len(tests)}

    views = [view(i) for i in range(len(rules))]
    jobs = [t for t in trials if "job" in t.user_attrs]
    starts = [t.datetime_start for t in jobs if t.datetime_start]
    ends = [t.datetime_complete for t in jobs if t.datetime_complete]
    running = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in jobs)
    done = SEEDS_ATTR in attrs and not running
    mine = views[pick]
    chosen = mine["chosen"]
    return {**mine, "study": child.study_name, "done": done, "notes": list(attrs.get(NOTES_ATTR, [])),
            "all_finalists": all_finalists,
            "config": config.to_dict(final_config(spec, chosen["params"])) if chosen else None,
            "picks": [{"rule": v["pick"], "chosen": v["chosen"], "test_mean": v["test_mean"], "test_std": v["test_std"],
                       "tested": v["tested"], "seeds": len(v["seeds"]), "model": v["model"],
                       "n_params": v["chosen"]["n_params"] if v["chosen"] else None} for v in views],
            "wall_s": (max(ends) - min(starts)).total_seconds() if starts and ends and done else None,
            "compute_s": sum(r["seconds"] or 0 for r in all_finalists + all_seeds),
            "metric": goal.name}


def summary_line(res: dict) -> str:
    """One line: the final test accuracy (mean ± std over seeds), or where the stage is."""
    n_seeds = sum(s["state"] == "COMPLETE" for s in res["seeds"])
    if res["test_mean"] is not None:
        std = f" ± {res['test_std']:.2%}" if res["test_std"] is not None else ""
        chosen = res["chosen"]
        src = label(chosen) if chosen else "the start"
        if chosen and chosen["n_params"]:
            src += f", {chosen['n_params']:,} params"
        tested = sum(s["test_acc"] is not None for s in res["seeds"])
        of = "" if tested == len(res["seeds"]) else f" of {len(res['seeds'])}"
        state = "" if res["done"] else " so far"
        plural = "s" if (len(res["seeds"]) if of else tested) != 1 else ""
        head = f"final (pick {res['pick']})" if len(res.get("picks", ())) > 1 else "final"
        return (f"{head}: test acc {res['test_mean']:.2%}{std} over {tested}{of} seed{plural}"
                f"{state} ({src}, chosen from {_count(len(res['finalists']), 'finalist')} on validation)")
    finalists = res.get("all_finalists", res["finalists"])  # with several picks, every pick's
    fin_done = sum(f["state"] in ("COMPLETE", "PRUNED", "FAIL") for f in finalists)
    if res["chosen"] is None:
        if res["done"]:
            return "final: no result (see the notes)"
        return f"final stage: {fin_done}/{_count(len(finalists), 'finalist')} trained"
    return f"final stage: chosen {label(res['chosen'])}; {n_seeds}/{len(res['seeds'])} seed runs done"


def pick_lines(res: dict) -> list[str]:
    """With several picks, one line for each: its rule, test accuracy and chosen network."""
    if len(res["picks"]) < 2:
        return []
    lines = []
    for p in res["picks"]:
        chosen = p["chosen"]
        if chosen is None:
            lines.append(f"pick {p['rule']}: " + ("no finalist finished" if res["done"] else "finalists training"))
            continue
        src = label(chosen)
        size = f", {chosen['n_params']:,} params" if chosen["n_params"] else ""
        if p["test_mean"] is None:
            test = f"chosen, {p['seeds']} seed runs queued"
        else:
            std = f" ± {p['test_std']:.2%}" if p["test_std"] is not None else ""
            test = f"test acc {p['test_mean']:.2%}{std} over {p['tested']} seed{'s' if p['tested'] != 1 else ''}"
        lines.append(f"pick {p['rule']}: {test} ({src}{size})")
    return lines
