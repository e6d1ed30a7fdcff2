"""Studies in storage: create from a spec (once), load with the stored spec, summarise, delete.

The validated spec is stored in the study's user attrs, so a worker on another machine needs
only the study name and the storage URL.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import optuna

import search
from search import check, finalstage, objectives, pace, space
from search import spec as spec_mod
from search.errors import StudyError
from search.storage import (UID_ATTR, Store, delete_study, live_trials, open_store, trials_by_state,
                            trials_in_state)

SPEC_ATTR = "cnnsearch_spec"


@dataclass(frozen=True)
class Created:
    study: optuna.Study
    created: bool  # False: the same spec was already stored under this name
    warnings: tuple[str, ...] = ()  # one line each (the data on this machine, an inert sampler or pruner)


def _stored_spec(study: optuna.Study, wait: float = 60.0, wait_foreign: float = 5.0, validate: bool = True):
    """The study's spec. A study created a moment ago by another process may not have it yet:
    wait while its creator is still at work (its version attr is set first), briefly otherwise.
    `validate=False`: rebuilt without the checks against models, data and Optuna (see
    `spec.spec_from_dict`); the spec was validated when the study was created."""
    started = time.monotonic()
    while True:
        attrs = study.user_attrs
        if SPEC_ATTR in attrs:
            return spec_mod.spec_from_dict(attrs[SPEC_ATTR], validate=validate)
        if time.monotonic() - started > (wait if "cnnsearch_version" in attrs else wait_foreign):
            raise StudyError(f"study {study.study_name!r} was not created by cnnsearch (no stored spec)")
        time.sleep(0.2)


def create(spec, store: Store | str | None = None, *, replace: bool = False, force: bool = False,
           data_dir: str | None = None) -> Created:
    """Create the study for `spec`; idempotent for an identical spec.

    `data_dir` (a command's --data-dir) is where this machine's data is looked at (see
    `spec.with_data_dir`); the stored spec keeps the file's data.data_dir.

    Eight processes creating the same new study at once end with one study, and the spec's
    enqueued configurations are added exactly once, by the process whose create succeeded.
    Each study gets a uid (UID_ATTR) of its own, so a worker of a replaced study can tell the
    new one from the old even where the new one took the old one's id (SQLite).

    Raises:
        StudyError: a different spec is stored under this name and `replace` is False; or
            `replace` while workers run trials of the old study and not `force` (see delete).
        DataError: a folder dataset's folder cannot be listed here (nothing is written then).
    """
    # Imported before the study exists: the processes that lose the race wait for the winner's
    # spec, and a cold import of optuna-dashboard takes seconds on a busy machine.
    from search.dashboard import describe_study  # the description as optuna-dashboard's study note
    import optuna_dashboard  # noqa: F401

    # Everything that can fail happens before anything is written: a folder that cannot be
    # listed must leave no half-made study behind (nor delete the one --replace would replace).
    classes, warnings = check.data_here(spec_mod.with_data_dir(spec, data_dir).data)
    warnings += check.budget_warnings(spec) + check.start_warnings(spec)
    storage = open_store(store, heartbeat_interval=None).storage
    warm, warm_notes = warm_start_params(spec, storage)
    wanted = spec_mod.spec_to_dict(spec)
    if replace:
        try:
            old = optuna.load_study(study_name=spec.name, storage=storage)
        except KeyError:
            old = None
        if old is not None:
            _delete(old, force, "--replace")
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage,
                                    directions=[o.direction for o in spec.objectives])
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        if spec_mod.spec_to_dict(_stored_spec(study)) != wanted:
            raise StudyError(f"study {spec.name!r} already exists with a different spec; "
                             "use create --replace to delete it and its trials, or choose another name "
                             "(--set study.name=NAME)") from None
        return Created(study, created=False, warnings=warnings)
    study.set_user_attr(UID_ATTR, uuid.uuid4().hex)  # first: the study's identity
    study.set_user_attr("cnnsearch_version", search.__version__)
    study.set_user_attr("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    study.set_user_attr("description", spec.description)
    if classes is not None:
        # A folder's class names travel with the study (and from there into exports and
        # checkpoints), so predictions print names; listing the folder decoded nothing.
        study.set_user_attr("classes", list(classes))
    for params in spec.enqueue:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    for params, source in warm:
        study.enqueue_trial(params, user_attrs={"warm_start": source}, skip_if_exists=True)
    warnings += warm_notes
    describe_study(study, spec)
    study.set_user_attr(SPEC_ATTR, wanted)  # last: its presence means the study is complete
    return Created(study, created=True, warnings=warnings)


def warm_start_params(spec, storage) -> tuple[list[tuple[dict, str]], tuple[str, ...]]:
    """The configurations `[warm_start]` enqueues: the other study's chosen final config (if it
    has one) and its `top` best completed trials, each cut to the parameters that fit this
    study's space, with a source ("<study> trial <n>") each; and one warning line per trial
    that lost parameters.

    Raises:
        StudyError: the other study is not in this storage, or has no completed trial.
    """
    if spec.warm_start is None:
        return [], ()
    other = spec.warm_start.study
    try:
        study = optuna.load_study(study_name=other, storage=storage)
    except KeyError:
        raise StudyError(f"warm_start.study: no study named {other!r} in this storage") from None
    other_spec = _stored_spec(study, validate=False)
    trials = study.get_trials(deepcopy=False)
    picked = objectives.ranked(trials, other_spec.objectives)[:spec.warm_start.top]
    if not picked:
        raise StudyError(f"warm_start.study: study {other!r} has no completed trial to start from")
    final = finalstage.results(study, other_spec)
    chosen = final["chosen"]["source_trial"] if final and final["chosen"] else None
    configs = [(dict(t.params), f"{other} trial {t.number}") for t in picked]
    if final and final["chosen"] and final["chosen"]["variant"]:  # a twin (final.variants): its own params first
        configs = [(dict(final["chosen"]["params"]), f"{other} {finalstage.label(final['chosen'])}"), *configs[:-1]]
    elif chosen is not None:  # what its final stage picked goes first
        picked = sorted(picked, key=lambda t: t.number != chosen)
        if chosen not in [t.number for t in picked]:
            picked = [next(t for t in trials if t.number == chosen), *picked[:-1]]
        configs = [(dict(t.params), f"{other} trial {t.number}") for t in picked]
    by_name = {p.name: p for p in spec.space}
    out, notes = [], []
    for params, source in configs:
        fits = {k: v for k, v in params.items() if k in by_name and space.contains(by_name[k], v)}
        dropped = [f"{k}={v!r}" for k, v in params.items() if k not in fits]
        if dropped:
            notes.append(f"warm_start: {source}: {', '.join(dropped)} "
                         f"do{'es' if len(dropped) == 1 else ''} not fit this study's space; dropped")
        if fits:
            out.append((fits, source))
    return out, tuple(notes)


def load(name: str, store: Store | str | None = None, *, validate: bool = True,
         **storage_kwargs) -> tuple[optuna.Study, object]:
    """(study, spec) for a study created by cnnsearch; `storage_kwargs` apply when `store` is a URL
    (a URL is opened with create=False: loading never creates storage). `validate=False` for
    commands that only read the spec (status, best, export, report): no torch, no trial run."""
    storage = open_store(store, **{"create": False, **storage_kwargs}).storage
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
        known = f" (studies here: {', '.join(names)})" if names else " (this storage has no studies)"
        raise StudyError(f"no study named {name!r}{known}") from None
    return study, _stored_spec(study, validate=validate)


def list_studies(store: Store | str | None = None) -> list[dict]:
    """A row per study: name, n_trials, best (one objective: the best value), front (several:
    how many trials are on Optuna's Pareto front), final_of (a final stage's child study: the
    study it finishes), started."""
    storage = open_store(store, heartbeat_interval=None, create=False).storage
    rows = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=True):
        multi = len(s.directions) > 1
        front = len(optuna.load_study(study_name=s.study_name, storage=storage).best_trials) if multi else None
        rows.append({"name": s.study_name, "n_trials": s.n_trials,
                     "best": s.best_trial.value if s.best_trial and not multi else None, "front": front,
                     "final_of": s.study_name.removesuffix(finalstage.SUFFIX)
                     if s.study_name.endswith(finalstage.SUFFIX) else None,
                     "started": s.datetime_start})
    return sorted(rows, key=lambda r: r["name"])


def summary(name: str, store: Store | str | None = None, workers: int | None = None) -> dict:
    """Counts by state, the best trial, the running trials with host, device and age, and what is
    left at the measured pace (`pace.project`, shared among `workers`; default: those running)."""
    study, spec = load(name, store, heartbeat_interval=None, validate=False)
    counts = trials_by_state(study)
    now = datetime.now()
    running = [{"number": t.number, "host": t.user_attrs.get("host", "?"),
                "device": t.user_attrs.get("device", "?"), "worker_index": t.user_attrs.get("worker_index"),
                "sampler_seed": t.user_attrs.get("sampler_seed"),
                "age_s": (now - t.datetime_start).total_seconds() if t.datetime_start else None,
                "epochs": len(t.intermediate_values) or len(t.user_attrs.get("curve") or ())}
               for t in trials_in_state(study, optuna.trial.TrialState.RUNNING)]
    states = (optuna.trial.TrialState.COMPLETE,) + ((optuna.trial.TrialState.PRUNED,) if spec.limits else ())
    done = study.get_trials(deepcopy=False, states=states)
    best = objectives.best(done, spec.objectives)
    front = objectives.pareto_front(done, spec.objectives) if spec.multi else None
    final = finalstage.results(study, spec)
    return {"name": name, "spec": spec, "counts": counts, "finished": counts.get("COMPLETE", 0)
            + counts.get("PRUNED", 0), "budget": spec.n_trials, "running": running,
            "final": final,
            "projection": pace.project(study.get_trials(deepcopy=False), spec, final, workers),
            "best": None if best is None else {"number": best.number,
                                               "value": objectives.learned_value(best, spec.objectives),
                                               "params": best.params, "user_attrs": best.user_attrs},
            # several objectives: the Pareto front, best learned value first; trials over a per-trial limit
            "front": None if front is None else [{"number": t.number, "values": dict(zip(
                [o.name for o in spec.objectives], t.values))} for t in front],
            "infeasible": sum("infeasible" in t.user_attrs for t in done)}


def best_trial(name: str, store: Store | str | None = None, number: int | None = None, rank: int = 1,
               pick: str | None = None):
    """(study, spec, trial): the best completed trial (the `rank`-th best), or trial `number`, or
    in a multi-objective study the Pareto trial `pick` asks for (`objectives.pick`: "knee",
    "max_params=300000")."""
    study, spec = load(name, store, heartbeat_interval=None, validate=False)
    if pick is not None:
        return study, spec, objectives.pick(study.get_trials(deepcopy=False), spec.objectives, pick)
    if number is None:
        done = objectives.ranked(study.get_trials(deepcopy=False), spec.objectives)
        if not done:
            raise StudyError(f"study {name!r} has no {'feasible completed' if spec.multi else 'finished'} trial yet")
        if rank < 1 or rank > len(done):
            what = "trials on its Pareto front" if spec.multi else "completed trials"
            raise StudyError(f"--rank {rank}: study {name!r} has {len(done)} {what}")
        return study, spec, done[rank - 1]
    matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not matches or matches[0].state != optuna.trial.TrialState.COMPLETE:
        raise StudyError(f"study {name!r} has no completed trial number {number}")
    return study, spec, matches[0]


def refuse_if_running(study: optuna.Study, option: str = "") -> None:
    """StudyError while workers run trials of `study`: RUNNING trials with a fresh heartbeat."""
    live = live_trials(study)
    if live:
        first = live[0]
        where = f" on {first['host']}" if first["host"] else ""
        beat = f", last heartbeat {first['beat_s']:.0f} s ago" if first["beat_s"] is not None else ""
        more = f" and {len(live) - 1} more" if len(live) > 1 else ""
        raise StudyError(f"study {study.study_name!r} has workers running: trial {first['number']}{where}"
                         f"{beat}{more}; stop them first, or add --force{' to ' + option if option else ''} "
                         "(they then stop at their next write)")


def _delete(study: optuna.Study, force: bool, option: str = "") -> None:
    """Delete `study` and its final stage's child study (search/finalstage.py), child first."""
    child = finalstage.load_child(study)
    if not force:
        refuse_if_running(study, option)
        if child is not None:
            refuse_if_running(child, option)
    if child is not None:
        try:
            delete_study(child)
        except KeyError:
            pass
    # The storage's delete locks the study first and checks it is gone afterwards (retrying a
    # delete that a worker's insert rolled back), so "deleted" is only ever said when true.
    try:
        delete_study(study)
    except KeyError:
        pass  # deleted by someone else a moment ago: gone all the same


def delete(name: str, store: Store | str | None = None, *, force: bool = False) -> None:
    """Delete study `name` and its trials.

    Raises:
        StudyError: no such study; workers run trials of it (a fresh heartbeat) and not `force`;
            or it is still there after the delete was tried again a few times.
    """
    store = open_store(store, heartbeat_interval=None, create=False)
    study, _ = load(name, store, validate=False)  # same "no study named" error as everywhere
    _delete(study, force)
