"""Best trial -> a self-contained RunConfig file: what `cnnsearch export` writes.

`export_best` writes what `cnnsearch train` reads unchanged (search.final): the RunConfig under
"config", and under "provenance" where it came from (study, trial, value, data split, versions,
masked storage URL).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from search import config, space
from search import study as study_mod
from search.files import write_json
from search.provenance import versions
from search.storage import Store, mask_url, open_store

EXPORT_FORMAT = "cnnsearch-export/1"


def export_document(study, spec, trial, url: str) -> dict[str, Any]:
    """The export of one trial: {"format", "config", "provenance"}; the storage `url` appears masked."""
    cfg = space.params_to_config(spec, trial.params)
    keep = ("n_params", "best_epoch", "epoch_seconds", "train_seconds", "device", "precision", "stop_reason")
    provenance = {
        "study": study.study_name, "trial": trial.number, "metric": spec.metric,
        "direction": spec.direction, "value": trial.value, "params": dict(trial.params),
        "trial_attrs": {k: trial.user_attrs[k] for k in keep if k in trial.user_attrs},
        "data": {"dataset": cfg.dataset, "data_options": cfg.data_options, "val_fraction": cfg.val_fraction,
                 "val_seed": cfg.val_seed, "subset": cfg.subset},
        "versions": versions(), "storage": mask_url(url),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if study.user_attrs.get("classes"):  # folder datasets: recorded by study.create
        provenance["classes"] = list(study.user_attrs["classes"])
    return {"format": EXPORT_FORMAT, "config": config.to_dict(cfg), "provenance": provenance}


def export_best(name: str, path: str | Path, store: Store | str | None = None, number: int | None = None,
                rank: int = 1) -> dict:
    """Write the best (the `rank`-th best, or trial `number`'s) config of study `name` to `path`.

    Raises:
        search.study.StudyError: no such study, or no finished (completed) trial.
    """
    store = open_store(store, heartbeat_interval=None)
    study, spec, trial = study_mod.best_trial(name, store, number, rank)
    doc = export_document(study, spec, trial, store.url)
    write_json(path, doc)
    return doc
