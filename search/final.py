"""Final training of one configuration: what `cnnsearch train` runs on an exported file.

`train_final` runs the search's own engine once per seed, evaluates the test split once at the
end of each run and writes model.pt (search.modelfile), metrics.json and curves.png.

While it trains, <out_dir>/checkpoint.pt holds the running seed's `TrainState` as of its last
finished epoch, with the finished seeds' results (search.checkpoints); `resume_point` reads it
back and `train_final(..., resume=)` continues from it, to the same weights as a run never
stopped (bitwise on the CPU). The file is deleted once the whole run has finished.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import models
from search import checkpoints, config, datasets, engine
from search.errors import CheckpointError, ExportError
from search.files import write_atomic, write_json
from search.modelfile import export_onnx, require_onnx, save_model_file
from search.provenance import versions


@dataclass
class FinalResult:
    out_dir: Path
    runs: list[dict]  # per seed: seed, history, best_val_acc, test_acc, seconds, ...
    test_mean: float | None  # None when the test split was not read
    test_std: float | None  # sample standard deviation; None for one seed
    files: list[Path]
    model_seed: int  # the seed whose model model.pt holds (see `train_final`)
    test_images: int  # size of the test split (the noise in one run's test accuracy depends on it)

    def sampling_std(self) -> float | None:
        """The binomial standard deviation of one run's test accuracy on `test_images` images:
        differences between single runs smaller than about this are noise."""
        if self.test_mean is None or not self.test_images:
            return None
        return (self.test_mean * (1 - self.test_mean) / self.test_images) ** 0.5


CHECKPOINT = "checkpoint.pt"  # in the run folder, while the run is unfinished


@dataclass
class ResumePoint:
    """An unfinished run's checkpoint, read back: the settings it ran with and where it stopped."""

    cfg: config.RunConfig  # the run's configuration (its first seed)
    seeds: int
    full_train: bool
    onnx: bool
    test: bool
    checkpoint_every: int
    seed: int  # the seed being trained when the checkpoint was saved
    epoch: int  # that seed's finished epochs
    saved: dict  # the checkpoint itself: pass it to train_final(resume=)


def resume_point(out_dir: str | Path) -> ResumePoint:
    """The checkpoint an interrupted `train_final` left in `out_dir`.

    Raises:
        CheckpointError: no checkpoint there (the run finished, or never finished an epoch), or
            one that cannot be read (truncated, foreign, from another cnnsearch version).
    """
    out = Path(out_dir)
    path = out / CHECKPOINT
    if not out.is_dir():
        raise CheckpointError(f"--resume {out}: no such folder")
    if not path.exists():
        raise CheckpointError(f"--resume {out}: no {CHECKPOINT} there, nothing to resume (the run finished, "
                              "or was stopped before its first epoch ended)")
    saved = checkpoints.load_state(path)
    try:
        run = saved["final"]
        return ResumePoint(config.from_dict(run["cfg"]), run["seeds"], run["full_train"], run["onnx"],
                           run["test"], run["checkpoint_every"], saved["seed"],
                           saved["state"]["progress"]["epoch"], saved)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a final-training checkpoint (no {exc})") from None


def train_final(cfg: config.RunConfig, out_dir: str | Path, *, seeds: int = 1, full_train: bool = False,
                onnx: bool = False, test: bool = True,
                on_epoch: Callable[[int, int, dict], None] | None = None,
                checkpoint_every: int = 1, resume: dict | None = None) -> FinalResult:
    """Final training: `seeds` runs (cfg.seed, cfg.seed + 1, ...), each testing once at its end.

    Args:
        cfg: the configuration (an exported file's "config").
        out_dir: created if needed; gets model.pt, metrics.json, curves.png and, with `onnx`,
            model.onnx. With several seeds model.pt holds the run with the best last-epoch
            validation accuracy (chosen without the test split; the first seed on ties and with
            `full_train`, which has no validation); `FinalResult.model_seed` says which.
        seeds: number of runs; test accuracy is reported as mean and standard deviation.
        full_train: train on train + validation (no validation metrics then).
        onnx: also write model.onnx and check it against PyTorch on a batch of training images.
        test: evaluate the test split; False for finalists compared on validation (test_mean
            and test_std are then None).
        on_epoch: progress hook, called as on_epoch(seed, epoch, metrics), after that epoch's
            checkpoint is saved.
        checkpoint_every: save <out_dir>/checkpoint.pt every this many epochs (and after each
            seed's last epoch); 0: never. Deleted when the whole run has finished.
        resume: `ResumePoint.saved` of an interrupted run in `out_dir`: finished seeds are not
            trained again (their results and chosen model come from it), the running seed goes
            on from its last saved epoch. cfg and the options must be the saved run's (only
            device and data_dir may differ). Without it, a checkpoint in `out_dir` is an error.
    """
    if checkpoint_every < 0:
        raise ExportError(f"--checkpoint-every: must be 0 (off) or more, got {checkpoint_every}")
    if seeds < 1:
        raise ExportError(f"--seeds: must be at least 1, got {seeds}")
    if not test and full_train:
        raise ExportError("--no-test with --full-train leaves nothing to measure: no validation, no test")
    if onnx:
        require_onnx()
    ds = datasets.dataset_for(cfg)  # data, device and model errors first: they leave no empty folder
    engine.resolve_device(cfg.device)
    models.build_model(cfg, ds.in_shape, ds.num_classes)
    out = Path(out_dir)
    try:  # now, not after an hour of training
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    ckpt_path = out / CHECKPOINT
    run_doc = {"cfg": config.to_dict(cfg), "seeds": seeds, "full_train": full_train, "onnx": onnx, "test": test,
               "checkpoint_every": checkpoint_every}
    runs, chosen, chosen_val = [], None, None
    if resume is None and ckpt_path.exists():
        raise ExportError(f"--out {out} holds an interrupted run's {CHECKPOINT}: continue it with "
                          f"`cnnsearch train --resume {out}`, or delete the file")
    if resume is not None:
        _check_same_run(resume, run_doc, ckpt_path)
        runs = [dict(r) for r in resume["runs"]]
        if resume["chosen"] is not None:
            c = resume["chosen"]
            model = models.build_model(cfg.replace(seed=c["seed"]), ds.in_shape, ds.num_classes)
            model.load_state_dict(c["model"])
            chosen, chosen_val = (c["seed"], model), c["val"]
    device = engine.resolve_device(cfg.device)
    ds_dev = datasets.to_device(ds, device)
    for seed in range(cfg.seed + len(runs), cfg.seed + seeds):
        started = time.perf_counter()
        seed_cfg = cfg.replace(seed=seed)
        state = engine.TrainState.start(seed_cfg, ds_dev, device, full_train=full_train)
        spent = 0.0
        if resume is not None and resume["seed"] == seed:
            state.load_state_dict(resume["state"])
            spent = resume["seconds"]

        def hook(e: int, m: dict, seed=seed, state=state, started=started, spent=spent) -> None:
            if checkpoint_every and (state.epoch % checkpoint_every == 0 or state.stop_reason is not None):
                done = {"seed": chosen[0], "val": chosen_val,
                        "model": chosen[1].state_dict()} if chosen is not None else None
                checkpoints.save_state(ckpt_path, state, {
                    "final": run_doc, "seed": seed, "runs": runs, "chosen": done,
                    "seconds": spent + time.perf_counter() - started})
            if on_epoch:
                on_epoch(seed, e, m)

        result = engine.fit(seed_cfg, hook, dataset=ds_dev, evaluate_test=test, full_train=full_train, state=state)
        runs.append({"seed": seed, "stop_reason": result.stop_reason, "n_params": result.n_params,
                     "device": result.device, "precision": result.precision, "cuda_graph": result.cuda_graph, "best_val_acc": result.best_val_acc if result.best_epoch >= 0 else None,
                     "best_epoch": result.best_epoch if result.best_epoch >= 0 else None,
                     "final_val_acc": result.history[-1].get("val_acc") if result.history else None,
                     "test_acc": result.test_acc, "test_loss": result.test_loss,
                     "seconds": round(spent + time.perf_counter() - started, 3), "history": result.history})
        val = runs[-1]["final_val_acc"]
        if chosen is None or (val is not None and (chosen_val is None or val > chosen_val)):
            chosen, chosen_val = (seed, result.model), val
    tests = [r["test_acc"] for r in runs] if test else []
    mean = statistics.fmean(tests) if tests else None
    std = statistics.stdev(tests) if len(tests) > 1 else None
    model_seed, model = chosen
    files = [save_model_file(out / "model.pt", model, cfg.replace(seed=model_seed), ds)]
    if onnx:
        files.append(export_onnx(model, out / "model.onnx", ds, tta_flip=cfg.tta_flip))
    files.append(write_json(out / "metrics.json", {
        "config": config.to_dict(cfg), "full_train": full_train, "seeds": [r["seed"] for r in runs],
        "tested": test, "test_acc_mean": mean, "test_acc_std": std, "test_images": len(ds.test_y),
        "model_seed": model_seed, "classes": list(ds.classes),
        "versions": versions(), "runs": runs}))
    files.append(plot_curves(runs, out / "curves.png"))
    ckpt_path.unlink(missing_ok=True)  # the run is whole: nothing left to resume
    return FinalResult(out, runs, mean, std, files, model_seed, len(ds.test_y))


def _check_same_run(saved: dict, run_doc: dict, path: Path) -> None:
    """The options given with resume= must be the checkpoint's: device and data_dir aside."""
    was = saved["final"]
    differ = [k for k in ("seeds", "full_train", "onnx", "test") if was[k] != run_doc[k]]
    differ += [k for k, v in run_doc["cfg"].items() if k not in engine.PLACE_KEYS and was["cfg"].get(k) != v]
    if differ:
        raise CheckpointError(f"{path} was saved by another run: {', '.join(differ)} differ")


def plot_curves(runs: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, one line per seed (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for run in runs:
        epochs = [h["epoch"] + 1 for h in run["history"]]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "acc")):
            line, = ax.plot(epochs, [h[f"train_{key}"] for h in run["history"]], label=f"train (seed {run['seed']})")
            if all(f"val_{key}" in h for h in run["history"]):
                ax.plot(epochs, [h[f"val_{key}"] for h in run["history"]], "--", color=line.get_color(),
                        label=f"val (seed {run['seed']})")
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))


def default_run_dir(config_file: str | Path | None, root: str | Path = "runs") -> Path:
    """runs/<config stem>-<local time>, or runs/<local time> without a file; never an existing folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / (f"{Path(config_file).stem}-{stamp}" if config_file else stamp)
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path
