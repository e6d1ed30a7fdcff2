"""The model file (model.pt) that final training writes and `cnnsearch predict` reads.

A model.pt holds only tensors and plain data (state dict, RunConfig, class names, input shape,
normalisation), so `load_model_file` can use `torch.load(weights_only=True)`: loading one never
runs pickled code. Also here: model.onnx next to it, and what a loaded model file does
(classify image files, evaluate its dataset's test split).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import models
from search import config, datasets, engine
from search.augment import Normalizer
from search.errors import CheckpointError, ExportError, first_line
from search.files import write_atomic

MODEL_FILE_FORMAT = "cnnsearch-checkpoint/1"  # the value stays: model.pt files in the wild carry it
_KEYS = ("format", "state_dict", "config", "classes", "in_shape", "mean", "std")


def save_model_file(path: Path, model: torch.nn.Module, cfg: config.RunConfig, ds) -> Path:
    """model.pt: state dict + config + classes + input shape + normalisation, plain data only."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    doc = {"format": MODEL_FILE_FORMAT, "state_dict": state, "config": config.to_dict(cfg),
           "classes": list(ds.classes), "in_shape": list(ds.in_shape), "mean": list(ds.mean), "std": list(ds.std)}
    return write_atomic(path, lambda f: torch.save(doc, f))


def require_onnx() -> None:
    """Raise ExportError unless `export_onnx` can run (onnx and onnxruntime installed)."""
    for package in ("onnx", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            raise ExportError(f"--onnx needs the {package} package: pip install onnx onnxruntime") from None


def export_onnx(model: torch.nn.Module, path: Path, ds, atol: float = 1e-4, tta_flip: bool = False) -> Path:
    """model.onnx with a dynamic batch size, checked against PyTorch on up to 64 training images.
    With `tta_flip` the graph averages the image's and its mirror image's logits."""
    import inspect

    import onnxruntime

    model = model.float().to("cpu", memory_format=torch.contiguous_format).eval()
    if tta_flip:
        model = engine.FlipAveraged(model).eval()
    x = Normalizer(ds.mean, ds.std, torch.device("cpu"))(ds.train_x[:64].cpu())
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
class ModelFile:
    model: torch.nn.Module  # in eval mode
    config: config.RunConfig
    classes: list[str]
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_model_file(path: str | Path, device: str = "cpu") -> ModelFile:
    """Load a model.pt written by final training; anything else is a one-line CheckpointError."""
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
    if not isinstance(raw, dict) or raw.get("format") != MODEL_FILE_FORMAT:
        raise CheckpointError(f"{path}: not a cnnsearch checkpoint (expected a model.pt written by cnnsearch train)")
    missing = [k for k in _KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    try:
        cfg = config.from_dict(raw["config"], source=str(path))
        in_shape = tuple(int(s) for s in raw["in_shape"])
        model = models.build_model(cfg, in_shape, len(raw["classes"]))
        model.load_state_dict(raw["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint does not match its model ({first_line(exc)})") from None
    return ModelFile(model.to(engine.resolve_device(device)).eval(), cfg, [str(c) for c in raw["classes"]],
                     in_shape, tuple(raw["mean"]), tuple(raw["std"]))


def read_image(path: str | Path, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """A PNG/JPEG file -> uint8 [C, H, W], decoded as image folders are (search.datasets.folder)."""
    from search.datasets.folder import _decode_one

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
def predict_images(loaded: ModelFile, paths: Sequence[str | Path]) -> list[Prediction]:
    """The most likely class of each image, with its softmax probability."""
    device = next(loaded.model.parameters()).device
    batch = torch.stack([read_image(p, loaded.in_shape) for p in paths]).to(device)
    norm = Normalizer(loaded.mean, loaded.std, device)
    model = engine.FlipAveraged(loaded.model) if loaded.config.tta_flip else loaded.model
    probs = torch.softmax(model(norm(batch)).float(), dim=1)
    best, index = probs.max(dim=1)
    return [Prediction(str(p), i, loaded.classes[i], b) for p, i, b in zip(paths, index.tolist(), best.tolist())]


def evaluate_model_file(loaded: ModelFile, data_dir: str | None = None) -> tuple[float, float, int]:
    """(accuracy, loss, images) of the loaded model on its config's dataset test split, read from
    `data_dir` (predict's --data-dir) > $CNNSEARCH_DATA > the config's data_dir > ./data. At the
    precision its run tested it (bf16 autocast where `precision` gives it on this device), so on
    the machine that trained it the figure is the run's own recorded test accuracy."""
    cfg = loaded.config.replace(data_dir=datasets.choose_data_dir(data_dir, loaded.config.data_dir))
    device = next(loaded.model.parameters()).device
    ds = datasets.to_device(datasets.dataset_for(cfg), device)
    if tuple(ds.in_shape) != loaded.in_shape or ds.num_classes != len(loaded.classes):
        raise CheckpointError(f"the {cfg.dataset} data here has shape {ds.in_shape} and {ds.num_classes} classes; "
                              f"the checkpoint expects {loaded.in_shape} and {len(loaded.classes)}")
    loss, acc = engine.evaluate(loaded.model, ds.test_x, ds.test_y, Normalizer(loaded.mean, loaded.std, device),
                                bf16=engine.uses_bf16(loaded.config.precision, device), tta_flip=loaded.config.tta_flip)
    return acc, loss, len(ds.test_y)
