"""mnist and fashion_mnist: torchvision's file layout under the data directory, read directly."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import torch

from search.errors import DataError

from ._common import _torchvision, not_found
from ._registry import register_dataset

_MNIST_LIKE = {  # name -> (torchvision class and folder name, class names)
    "mnist": ("MNIST", tuple(str(i) for i in range(10))),
    "fashion_mnist": ("FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                       "Shirt", "Sneaker", "Bag", "Ankle boot")),
}


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (MNIST format), plain or .gz, as a uint8 tensor; no PIL, no extra copies."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        buf = bytearray(f.read())
    try:  # header: 0, 0, dtype 0x08 (uint8), ndim; then ndim big-endian sizes
        ndim = buf[3]
        shape = struct.unpack(f">{ndim}I", buf[4:4 + 4 * ndim])
        valid = buf[2] == 0x08 and len(buf) == 4 + 4 * ndim + math.prod(shape)
    except (IndexError, struct.error):
        valid = False
    if not valid:
        raise DataError(f"{path} is not a uint8 IDX file (truncated or corrupted); delete it and re-download")
    return torch.frombuffer(buf, dtype=torch.uint8, offset=4 + 4 * ndim).view(*shape)


_STEMS = [f"{s}-{kind}" for s in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]


def _find(raw: Path, stem: str) -> Path | None:
    """The plain file (faster) or the .gz (needs no unpacking), whichever is there."""
    return next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)


def _missing(name: str):
    """The registry's `missing(options, root)` for mnist-like `name`: the first absent file, or None."""
    folder = _MNIST_LIKE[name][0]
    return lambda options, root: next((f"{folder}/raw/{s}[.gz]" for s in _STEMS
                                       if _find(root / folder / "raw", s) is None), None)


def _load_mnist_like(name: str, root: Path, download: bool):
    """torchvision's layout, read directly: it insists on unpacked files, and data_dir may be read-only."""
    folder, classes = _MNIST_LIKE[name]
    raw = root / folder / "raw"
    missing = next((s for s in _STEMS if _find(raw, s) is None), None)
    if missing is not None and not download:
        raise not_found(name, root, f"{folder}/raw/{missing}[.gz]")
    if missing is not None:
        import torchvision  # slow to import; only downloads need it

        _torchvision(name, getattr(torchvision.datasets, folder), root, download=True)
    train_x, train_y, test_x, test_y = (_read_idx(_find(raw, s)) for s in _STEMS)
    return train_x.unsqueeze(1), train_y.long(), test_x.unsqueeze(1), test_y.long(), classes


@register_dataset("mnist", shape=lambda options: (1, 28, 28), classes=lambda options, root: 10,
                  uses_data_dir=True, stats=((0.1307,), (0.3081,)), missing=_missing("mnist"))
def _load_mnist(root, download, options):
    return _load_mnist_like("mnist", root, download)


@register_dataset("fashion_mnist", shape=lambda options: (1, 28, 28), classes=lambda options, root: 10,
                  uses_data_dir=True, stats=((0.2860,), (0.3530,)), missing=_missing("fashion_mnist"))
def _load_fashion_mnist(root, download, options):
    return _load_mnist_like("fashion_mnist", root, download)
