"""Best trial -> a self-contained RunConfig file; final training; checkpoints and prediction.

`export_best` writes what `cnnsearch train` reads unchanged: the RunConfig under "config", and
under "provenance" where it came from (study, trial, value, data split, versions, masked storage
URL). `train_final` runs the search's own engine once per seed, evaluates the test split once
at the end of each run and writes model.pt, metrics.json and curves.png. A model.pt holds only
tensors and plain data, so `load_checkpoint` can use `torch.load(weights_only=True)`: loading
a checkpoint never runs pickled code.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import models
from search import config, data, engine, space
from search import study as study_mod
from search.storage import mask_url, storage_url

EXPORT_FORMAT = "cnnsearch-export/1"
CHECKPOINT_FORMAT = "cnnsearch-checkpoint/1"
_CHECKPOINT_KEYS = ("format", "state_dict", "config", "classes", "in_shape", "mean", "std")


class ExportError(ValueError):
    """A user-facing export or final-training problem; one line."""


class CheckpointError(ValueError):
    """A file that is not a readable cnnsearch checkpoint, or an unreadable image; one line."""


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on."""
    found = {}
    for name in ("cnnsearch", "torch", "torchvision", "optuna"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if found["cnnsearch"] is None:  # running from a checkout that was never pip-installed
        import search

        found["cnnsearch"] = search.__version__
    return found


def export_document(study, spec, trial, url: str | None = None) -> dict[str, Any]:
    """The export of one trial: {"format", "config", "provenance"}; `url` appears masked."""
    cfg = space.params_to_config(spec, trial.params)
    keep = ("n_params", "best_epoch", "epoch_seconds", "train_seconds", "device", "precision", "stop_reason")
    provenance = {
        "study": study.study_name, "trial": trial.number, "metric": spec.metric,
        "direction": spec.direction, "value": trial.value, "params": dict(trial.params),
        "trial_attrs": {k: trial.user_attrs[k] for k in keep if k in trial.user_attrs},
        "data": {"dataset": cfg.dataset, "data_options": cfg.data_options, "val_fraction": cfg.val_fraction,
                 "val_seed": cfg.val_seed, "subset": cfg.subset},
        "versions": versions(), "storage": mask_url(storage_url(url)),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if study.user_attrs.get("classes"):  # folder datasets: recorded by study.create
        provenance["classes"] = list(study.user_attrs["classes"])
    return {"format": EXPORT_FORMAT, "config": config.to_dict(cfg), "provenance": provenance}


def write_atomic(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write a file through a temporary sibling and os.replace: never a half-written file."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise ExportError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _finite(value: Any) -> Any:
    """NaN/inf (a diverged run's loss) -> null: strict JSON readers (jq, browsers) reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return [_finite(v) for v in value] if isinstance(value, (list, tuple)) else value


def _write_json(path: str | Path, doc: Any) -> Path:
    return write_atomic(path, lambda f: f.write((json.dumps(_finite(doc), indent=2) + "\n").encode()))


def export_best(name: str, path: str | Path, url: str | None = None, number: int | None = None,
                rank: int = 1) -> dict:
    """Write the best (the `rank`-th best, or trial `number`'s) config of study `name` to `path`.

    Raises:
        search.study.StudyError: no such study, or no finished (completed) trial.
    """
    study, spec, trial = study_mod.best_trial(name, url, number, rank)
    doc = export_document(study, spec, trial, url)
    _write_json(path, doc)
    return doc


def _require_onnx() -> None:
    for package in ("onnx", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            raise ExportError(f"--onnx needs the {package} package: pip install onnx onnxruntime") from None


@dataclass
class FinalResult:
    out_dir: Path
    runs: list[dict]  # per seed: seed, history, best_val_acc, test_acc, seconds, ...
    test_mean: float | None  # None when the test split was not read
    test_std: float | None  # sample standard deviation; None for one seed
    files: list[Path]


def train_final(cfg: config.RunConfig, out_dir: str | Path, *, seeds: int = 1, full_train: bool = False,
                onnx: bool = False, test: bool = True,
                on_epoch: Callable[[int, int, dict], None] | None = None) -> FinalResult:
    """Final training: `seeds` runs (cfg.seed, cfg.seed + 1, ...), each testing once at its end.

    Args:
        cfg: the configuration (an exported file's "config").
        out_dir: created if needed; gets model.pt (the first seed's model), metrics.json,
            curves.png and, with `onnx`, model.onnx.
        seeds: number of runs; test accuracy is reported as mean and standard deviation.
        full_train: train on train + validation (no validation metrics then).
        onnx: also write model.onnx and check it against PyTorch on a batch of training images.
        test: evaluate the test split; False for finalists compared on validation (test_mean
            and test_std are then None).
        on_epoch: progress hook, called as on_epoch(seed, epoch, metrics).
    """
    if seeds < 1:
        raise ExportError(f"--seeds: must be at least 1, got {seeds}")
    if not test and full_train:
        raise ExportError("--no-test with --full-train leaves nothing to measure: no validation, no test")
    if onnx:
        _require_onnx()
    ds = data.dataset_for(cfg)  # data, device and model errors first: they leave no empty folder
    engine.resolve_device(cfg.device)
    models.build_model(cfg, ds.in_shape, ds.num_classes)
    out = Path(out_dir)
    try:  # now, not after an hour of training
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    runs, first_model = [], None
    for seed in range(cfg.seed, cfg.seed + seeds):
        started = time.perf_counter()
        hook = (lambda e, m, s=seed: on_epoch(s, e, m)) if on_epoch else None
        result = engine.fit(cfg.replace(seed=seed), hook, dataset=ds, evaluate_test=test, full_train=full_train)
        runs.append({"seed": seed, "stop_reason": result.stop_reason, "n_params": result.n_params,
                     "device": result.device, "precision": result.precision, "best_val_acc": result.best_val_acc if result.best_epoch >= 0 else None,
                     "best_epoch": result.best_epoch if result.best_epoch >= 0 else None,
                     "final_val_acc": result.history[-1].get("val_acc") if result.history else None,
                     "test_acc": result.test_acc, "test_loss": result.test_loss,
                     "seconds": round(time.perf_counter() - started, 3), "history": result.history})
        if first_model is None:
            first_model = result.model
    tests = [r["test_acc"] for r in runs] if test else []
    mean = statistics.fmean(tests) if tests else None
    std = statistics.stdev(tests) if len(tests) > 1 else None
    files = [save_checkpoint(out / "model.pt", first_model, cfg, ds)]
    if onnx:
        files.append(export_onnx(first_model, out / "model.onnx", ds))
    files.append(_write_json(out / "metrics.json", {
        "config": config.to_dict(cfg), "full_train": full_train, "seeds": [r["seed"] for r in runs],
        "tested": test, "test_acc_mean": mean, "test_acc_std": std, "classes": list(ds.classes),
        "versions": versions(), "runs": runs}))
    files.append(plot_curves(runs, out / "curves.png"))
    return FinalResult(out, runs, mean, std, files)


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


def save_checkpoint(path: Path, model: torch.nn.Module, cfg: config.RunConfig, ds) -> Path:
    """model.pt: state dict + config + classes + input shape + normalisation, plain data only."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ckpt = {"format": CHECKPOINT_FORMAT, "state_dict": state, "config": config.to_dict(cfg),
            "classes": list(ds.classes), "in_shape": list(ds.in_shape), "mean": list(ds.mean), "std": list(ds.std)}
    return write_atomic(path, lambda f: torch.save(ckpt, f))


def export_onnx(model: torch.nn.Module, path: Path, ds, atol: float = 1e-4) -> Path:
    """model.onnx with a dynamic batch size, checked against PyTorch on up to 64 training images."""
    import inspect

    import onnxruntime

    model = model.float().to("cpu", memory_format=torch.contiguous_format).eval()
    x = engine.Normalizer(ds.mean, ds.std, torch.device("cpu"))(ds.train_x[:64].cpu())
    # The TorchScript exporter needs only `onnx`; the newer dynamo exporter also wants onnxscript
    # and takes ~20 s for a small convnet, so ask for the old one where the keyword exists.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **legacy)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    worst = (got - expected).abs().max().item()
    if worst > atol * max(1.0, expected.abs().max().item()):
        raise ExportError(f"model.onnx gives logits up to {worst:.2g} away from PyTorch's; not written")
    return write_atomic(path, lambda f: f.write(buffer.getvalue()))


@dataclass
class Checkpoint:
    model: torch.nn.Module  # in eval mode
    config: config.RunConfig
    classes: list[str]
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    """Load a model.pt written by `train_final`; anything else is a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # random bytes, a pickle of code, a truncated zip: all the same to a user
        raise CheckpointError(f"{path}: not a cnnsearch checkpoint (cannot be loaded safely: "
                              f"{exc.__class__.__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a cnnsearch checkpoint (expected a model.pt written by cnnsearch train)")
    missing = [k for k in _CHECKPOINT_KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    try:
        cfg = config.from_dict(raw["config"], source=str(path))
        in_shape = tuple(int(s) for s in raw["in_shape"])
        model = models.build_model(cfg, in_shape, len(raw["classes"]))
        model.load_state_dict(raw["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{path}: checkpoint does not match its model ({reason})") from None
    return Checkpoint(model.to(engine.resolve_device(device)).eval(), cfg, [str(c) for c in raw["classes"]],
                      in_shape, tuple(raw["mean"]), tuple(raw["std"]))


def read_image(path: str | Path, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """A PNG/JPEG file -> uint8 [C, H, W], decoded as image folders are (search.folder)."""
    from search.folder import _decode_one

    channels, height, width = in_shape
    try:
        raw = Path(path).read_bytes()
        if height == width:
            return torch.from_numpy(_decode_one(raw, height, channels).copy())
        with Image.open(io.BytesIO(raw)) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
        tensor = torch.from_numpy(np.asarray(img).copy())
        return tensor[None] if channels == 1 else tensor.permute(2, 0, 1)
    except UnidentifiedImageError:
        raise CheckpointError(f"cannot read image {path}: not an image file PIL can decode") from None
    except Exception as exc:  # PIL raises many kinds for a bad file; the user needs the path
        reason = " ".join(str(exc).split()) or exc.__class__.__name__
        raise CheckpointError(f"cannot read image {path}: {reason}") from None


@dataclass(frozen=True)
class Prediction:
    path: str
    index: int
    label: str
    probability: float


@torch.no_grad()
def predict_images(ckpt: Checkpoint, paths: Sequence[str | Path]) -> list[Prediction]:
    """The most likely class of each image, with its softmax probability."""
    device = next(ckpt.model.parameters()).device
    batch = torch.stack([read_image(p, ckpt.in_shape) for p in paths]).to(device)
    norm = engine.Normalizer(ckpt.mean, ckpt.std, device)
    probs = torch.softmax(ckpt.model(norm(batch)).float(), dim=1)
    best, index = probs.max(dim=1)
    return [Prediction(str(p), i, ckpt.classes[i], b) for p, i, b in zip(paths, index.tolist(), best.tolist())]


def evaluate_checkpoint(ckpt: Checkpoint, data_dir: str | None = None) -> tuple[float, float, int]:
    """(accuracy, loss, images) of the checkpoint on its config's dataset test split."""
    cfg = ckpt.config if data_dir is None or ckpt.config.data_dir else ckpt.config.replace(data_dir=data_dir)
    device = next(ckpt.model.parameters()).device
    ds = data.to_device(data.dataset_for(cfg), device)
    if tuple(ds.in_shape) != ckpt.in_shape or ds.num_classes != len(ckpt.classes):
        raise CheckpointError(f"the {cfg.dataset} data here has shape {ds.in_shape} and {ds.num_classes} classes; "
                              f"the checkpoint expects {ckpt.in_shape} and {len(ckpt.classes)}")
    loss, acc = engine.evaluate(ckpt.model, ds.test_x, ds.test_y, engine.Normalizer(ckpt.mean, ckpt.std, device))
    return acc, loss, len(ds.test_y)


def default_run_dir(config_file: str | Path | None, root: str | Path = "runs") -> Path:
    """runs/<config stem>-<local time>, or runs/<local time> without a file; never an existing folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / (f"{Path(config_file).stem}-{stamp}" if config_file else stamp)
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path
