"""Best trial -> a self-contained RunConfig file: what `cnnsearch export` writes.

`export_best` writes what `cnnsearch train` reads unchanged (search.final): the RunConfig under
"config", and under "provenance" where it came from (study, trial, value, data split, versions,
masked storage URL).

The config is the trial's, budget included: a search on a training subset for few epochs exports
that subset and those epochs, which `cnnsearch train` repeats as they are. `search_budget` says
so and names the command that trains the final model on every training image instead.
"""

from __future__ import annotations

import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from search import config, finalstage, objectives, space
from search import study as study_mod
from search.errors import ExportError
from search.files import write_json
from search.provenance import versions
from search.storage import Store, open_store
from search.urls import mask_url

EXPORT_FORMAT = "cnnsearch-export/1"


def export_document(study, spec, trial, url: str) -> dict[str, Any]:
    """The export of one trial: {"format", "config", "provenance"}; the storage `url` appears masked."""
    cfg = space.params_to_config(spec, trial.params)
    keep = ("n_params", "macs", "latency_ms", "best_epoch", "epoch_seconds", "train_seconds", "device", "precision", "stop_reason")
    provenance = {
        "study": study.study_name, "trial": trial.number, "metric": spec.metric,
        "direction": spec.direction, "value": objectives.learned_value(trial, spec.objectives),
        **({"values": dict(zip([o.name for o in spec.objectives], trial.values))} if spec.multi else {}),
        "params": dict(trial.params),
        "trial_attrs": {k: trial.user_attrs[k] for k in keep if k in trial.user_attrs},
        "data": {"dataset": cfg.dataset, "data_options": cfg.data_options, "val_fraction": cfg.val_fraction,
                 "val_seed": cfg.val_seed, "subset": cfg.subset},
        "versions": versions(), "storage": mask_url(url),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if study.user_attrs.get("classes"):  # folder datasets: recorded by study.create
        provenance["classes"] = list(study.user_attrs["classes"])
    return {"format": EXPORT_FORMAT, "config": config.to_dict(cfg), "provenance": provenance}


def search_budget(doc: dict[str, Any], path: str | Path) -> tuple[str, str]:
    """Two lines for `cnnsearch export` to print: what the exported config (at `path`) carries
    over from the search's budget, and the command that trains the final model at full budget,
    every training image for N epochs (the caller says what N is).

    Example:
        >>> search_budget({"config": {"subset": 10000, "epochs": 4}}, "best.json")[1]
        'cnnsearch train best.json --set subset=null --epochs N --seeds 3'
    """
    cfg = doc["config"]
    images = "all training images" if cfg["subset"] is None else f"a subset of {cfg['subset']:,} training images"
    everything = "" if cfg["subset"] is None else " --set subset=null"
    return (f"carried over from the search: {images}, {cfg['epochs']} epochs",
            f"cnnsearch train {shlex.quote(str(path))}{everything} --epochs N --seeds 3")


def export_best(name: str, path: str | Path, store: Store | str | None = None, number: int | None = None,
                rank: int = 1, pick: str | None = None) -> dict:
    """Write the best (the `rank`-th best, or trial `number`'s, or the Pareto trial `pick` asks
    for: `objectives.pick`) config of study `name` to `path`.

    A study whose final stage has chosen its config (search/finalstage.py) exports that one, at
    the final budget, with the final results under provenance["final"]; `number` or a `rank`
    other than 1 still exports that search trial.

    Raises:
        search.study.StudyError: no such study, or no finished (completed) trial.
    """
    store = open_store(store, heartbeat_interval=None, create=False)
    study, spec, trial = study_mod.best_trial(name, store, number, rank, pick)
    stage_pick = 0 if pick is None else finalstage.pick_index(spec, pick)  # one of [final]'s picks: its result
    final = (finalstage.results(study, spec, stage_pick)
             if number is None and rank == 1 and stage_pick is not None else None)
    if final is not None and final["chosen"] is not None and final["chosen"]["source_trial"] is not None:
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == final["chosen"]["source_trial"])
    doc = export_document(study, spec, trial, store.url)
    if final is not None and final["chosen"] is not None:
        chosen = final["chosen"]
        doc["config"] = final["config"]
        doc["provenance"]["final"] = {k: final[k] for k in ("study", "pick", "test_mean", "test_std", "done", "model",
                                                            "wall_s", "compute_s", "notes")}
        doc["provenance"]["final"]["chosen_finalist"] = {k: chosen[k] for k in ("number", "value", "rank", "baseline",
                                                                                     "source_trial", "variant", "params")}
        doc["provenance"]["final"]["seeds"] = [{k: r[k] for k in ("seed", "state", "value", "test_acc", "model")}
                                               for r in final["seeds"]]
    write_json(path, doc)
    return doc


def export_model(name: str, path: str | Path, store: Store | str | None = None,
                 artifacts: str | None = None, pick: str | None = None) -> dict:
    """Copy the final model of study `name` (the final stage's best seed on validation; of its
    pick `pick`, one of [final]'s, when given) to `path`, a model.pt that `cnnsearch predict`
    takes. Returns the final results.

    Raises:
        ExportError: the study has no final stage, `pick` is not one of its picks, it has not
            finished, or its model file is not in the artifact store here.
    """
    from search.artifacts import artifact_store_if_any
    from search.files import write_atomic

    store = open_store(store, heartbeat_interval=None, create=False)
    study, spec = study_mod.load(name, store, validate=False)
    index = 0 if pick is None else finalstage.pick_index(spec, pick)
    if index is None:
        picks = spec.final.picks if spec.final is not None else ()
        raise ExportError(f"--model with --pick {pick}: study {name!r}'s final stage trained "
                          + (f"the picks {', '.join(picks)}; not this one" if picks else "no Pareto pick")
                          + " (without --model, --pick exports that search trial's config)")
    final = finalstage.results(study, spec, index)
    if final is None:
        raise ExportError(f"--model: study {name!r} has no final stage "
                          + ("yet" if spec.final is not None else "(no [final] section in its study file)"))
    if not final["done"] or final["model"] is None:
        raise ExportError(f"--model: study {name!r}'s final stage has no final model yet ({finalstage.summary_line(final)})")
    files = artifact_store_if_any(store.url, artifacts)
    if files is None:
        raise ExportError(f"--model: no artifact store here for {store.shown}; give --artifacts where the "
                          "workers kept their files")
    data = files.get_bytes(final["model"], f"study {name!r}'s final model")
    write_atomic(Path(path), lambda f: f.write(data))
    return final
