"""Datasets as whole uint8 tensors, loaded once per process, with a fixed validation split.

Every dataset comes back the same way: images uint8 [N, C, H, W], labels int64 [N], per-channel
mean/std in [0, 1] pixel units, and a validation split carved from the training set (stratified,
fixed seed) so the search never sees the test set. Loaders by name live in `_LOADERS`; each
returns (train_x, train_y, test_x, test_y, classes).

Normalisation stats: mnist, fashion_mnist and cifar10 use the standard published values (what
hand-written training scripts use, so exported configs behave the same); every other dataset
computes them from its training split after the validation split and before `subset`, so the
stats do not change with the subset size.
"""

from __future__ import annotations

import gzip
import inspect
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "folder")

_PUBLISHED_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    # The std over all training pixels; the often-copied 0.2023/0.1994/0.2010 is something else.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED = 0.2, 0  # digits ships no test split: carve a fixed one
_SYNTH_DEFAULTS = {"n": 1000, "classes": 10, "channels": 1, "size": 16, "seed": 0}


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming what is wrong."""


class DatasetNotFound(DataError):
    """The dataset's files are not in the data directory (and download was not asked for)."""


@dataclass(frozen=True, eq=False, repr=False)  # eq=False: identity hash, tensors are not comparable
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    skipped: int = 0  # unreadable image files left out (folder datasets)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, in_shape={self.in_shape}, classes={self.num_classes}, "
                f"train={len(self.train_y)}, val={len(self.val_y)}, test={len(self.test_y)}, "
                f"device={self.train_x.device})")


def resolve_folder_path(path: str | os.PathLike, data_dir: str | os.PathLike | None) -> Path:
    """A folder dataset's path: relative paths are under the data directory when one is given
    (argument or $CNNSEARCH_DATA), so study files name no machine's layout; else under the
    working directory."""
    path = Path(path).expanduser()
    base = data_dir or os.environ.get("CNNSEARCH_DATA")
    return path if path.is_absolute() or not base else Path(base).expanduser() / path


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """Where torchvision datasets live: the argument, else $CNNSEARCH_DATA, else ./data."""
    chosen = data_dir or os.environ.get("CNNSEARCH_DATA") or "data"
    return Path(chosen).expanduser().absolute()


def _stratified_pick(y: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Exactly k indices of y, each class in proportion (largest remainder), sorted."""
    classes, counts = torch.unique(y, return_counts=True)
    quota = counts.double() * k / len(y)
    take = quota.floor().long()
    short = k - int(take.sum())
    if short > 0:  # hand the leftover places to the largest remainders; ties to the lower class
        order = torch.argsort(-(quota - take), stable=True)
        take[order[:short]] += 1
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    y_perm = y[perm]
    picked = [perm[y_perm == c][:n] for c, n in zip(classes.tolist(), take.tolist())]
    return torch.cat(picked).sort().values if picked else torch.empty(0, dtype=torch.long)


def split_val(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int):
    """Hold out round(len(y) * val_fraction) samples, stratified by class; same seed, same split.

    Returns:
        (train_x, train_y, val_x, val_y), each keeping the original order.
    """
    if isinstance(val_fraction, bool) or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction: must be in [0, 1), got {val_fraction!r}")
    held = _stratified_pick(y, round(len(y) * val_fraction), seed)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held] = False
    return x[keep], y[keep], x[held], y[held]


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images in [0, 1] units, in chunks to bound memory."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in torch.split(x, 4096):
        c = chunk.to(torch.float64).div_(255.0)
        total += c.sum(dim=(0, 2, 3))
        squares += c.square_().sum(dim=(0, 2, 3))
    n = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(max(v, 1e-3), 4) for v in std.tolist())


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


_MNIST_LIKE = {  # name -> (torchvision class and folder name, class names)
    "mnist": ("MNIST", tuple(str(i) for i in range(10))),
    "fashion_mnist": ("FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                       "Shirt", "Sneaker", "Bag", "Ankle boot")),
}


def _load_mnist_like(name: str, root: Path, download: bool):
    """torchvision's layout, read directly: it insists on unpacked files, and data_dir may be read-only."""
    folder, classes = _MNIST_LIKE[name]
    raw = root / folder / "raw"
    stems = [f"{s}-{kind}" for s in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]

    def find(stem: str) -> Path | None:  # the plain file is faster; the .gz needs no unpacking
        return next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)

    missing = next((s for s in stems if find(s) is None), None)
    if missing is not None and not download:
        raise DatasetNotFound(f"{name} not found in {root} (looked for {folder}/raw/{missing}[.gz]); "
                              f"pass --data-dir DIR or add --download")
    if missing is not None:
        import torchvision

        _torchvision(name, getattr(torchvision.datasets, folder), root, download=True)
    train_x, train_y, test_x, test_y = (_read_idx(find(s)) for s in stems)
    return train_x.unsqueeze(1), train_y.long(), test_x.unsqueeze(1), test_y.long(), classes


def _torchvision(name: str, tv_class: Callable, root: Path, download: bool) -> list:
    """(train, test) torchvision datasets; its assorted errors (network, md5) become one DataError line."""
    try:
        return [tv_class(str(root), train=train, download=download) for train in (True, False)]
    except Exception as err:
        reason = " ".join(str(err).split())
        raise DataError(f"{name}: torchvision could not {'download' if download else 'read'} it in {root} "
                        f"({reason}); delete partial files and retry, or pass --data-dir DIR") from err


def _load_cifar10(root: Path, download: bool):
    needed = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    missing = next((f for f in needed if not (root / "cifar-10-batches-py" / f).is_file()), None)
    if missing is not None and not download:
        raise DatasetNotFound(f"cifar10 not found in {root} (looked for cifar-10-batches-py/{missing}); "
                              f"pass --data-dir DIR or add --download")
    import torchvision  # slow to import; only cifar10 and downloads need it

    parts = _torchvision("cifar10", torchvision.datasets.CIFAR10, root, download=missing is not None)
    xs = [torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous() for p in parts]  # NHWC -> NCHW
    ys = [torch.tensor(p.targets, dtype=torch.long) for p in parts]
    return xs[0], ys[0], xs[1], ys[1], tuple(parts[0].classes)


def _load_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)  # 0..16 -> 0..255
    y = torch.from_numpy(bunch.target).long()
    train_x, train_y, test_x, test_y = split_val(x, y, _DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)
    return train_x, train_y, test_x, test_y, tuple(str(i) for i in range(10))


def _make_synthetic(n: int, classes: int, channels: int, size: int, seed: int):
    """Smooth class prototypes, randomly shifted, with per-image contrast, brightness and noise.

    `n` training images (balanced classes) and n // 5 (at least `classes`) test images like them.
    Tuned so a one-conv CNN is at ~75% after one epoch and above 90% within a few: easy enough
    for fast tests, hard enough that learning rate and augmentation still matter.
    """
    g = torch.Generator().manual_seed(seed)
    m = min(3, max(1, size // 8))  # shift margin: position varies, so pooling/cropping help
    grid = max(2, min(4, size // 2))
    shared = torch.rand(1, channels, grid, grid, generator=g)  # common background makes classes closer
    protos = 0.3 * shared + 0.7 * torch.rand(classes, channels, grid, grid, generator=g)
    protos = torch.nn.functional.interpolate(protos, size=(size + 2 * m,) * 2, mode="bilinear", align_corners=False)
    total = n + max(classes, n // 5)
    y = (torch.arange(total) % classes)[torch.randperm(total, generator=g)]
    rows, cols = torch.randint(0, 2 * m + 1, (2, total, 1), generator=g) + torch.arange(size)
    x = protos[y.view(-1, 1, 1, 1), torch.arange(channels).view(1, -1, 1, 1),
               rows.view(total, 1, size, 1), cols.view(total, 1, 1, size)]  # each image its own crop
    contrast = 0.6 + 0.4 * torch.rand(total, 1, 1, 1, generator=g)
    brightness = 0.2 * (torch.rand(total, 1, 1, 1, generator=g) - 0.5)
    x = contrast * (x - 0.5) + 0.5 + brightness + 0.15 * torch.randn(x.shape, generator=g)
    x = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return x[:n], y[:n], x[n:], y[n:], tuple(f"class_{i}" for i in range(classes))


def _synthetic_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(_SYNTH_DEFAULTS))
    if unknown:
        raise DataError(f"options: unknown key {unknown[0]!r} for synthetic (valid: {', '.join(_SYNTH_DEFAULTS)})")
    opts = {**_SYNTH_DEFAULTS, **options}
    for key, low in (("n", 1), ("classes", 2), ("channels", 1), ("size", 2), ("seed", 0)):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"options.{key}: expected an integer >= {low}, got {value!r}")
    if opts["n"] < opts["classes"]:
        raise DataError(f"options.n: need at least one image per class ({opts['classes']}), got {opts['n']}")
    return opts


def _load_folder(options: dict):
    from search.folder import load_folder  # written alongside; imported late so other datasets never need it

    accepted = inspect.signature(load_folder).parameters
    if "path" not in options:
        raise DataError("options.path: the folder dataset needs the image folder's path")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(f"options: unknown key {unknown[0]!r} for folder (valid: {', '.join(accepted)})")
    data = load_folder(**options)
    return data.train_x, data.train_y, data.test_x, data.test_y, tuple(data.classes), data.skipped


_LOADERS: dict[str, Callable[[Path | None, bool, dict], tuple]] = {  # name -> (root, download, options)
    "digits": lambda root, download, options: _load_digits(),
    "synthetic": lambda root, download, options: _make_synthetic(**_synthetic_options(options)),
    "mnist": lambda root, download, options: _load_mnist_like("mnist", root, download),
    "fashion_mnist": lambda root, download, options: _load_mnist_like("fashion_mnist", root, download),
    "cifar10": lambda root, download, options: _load_cifar10(root, download),
    "folder": lambda root, download, options: _load_folder(options),
}
_USES_DATA_DIR = ("mnist", "fashion_mnist", "cifar10")


def _freeze(value: Any) -> Any:
    """A hashable stand-in for options (dicts, lists) so they can be part of a cache key."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set)):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        raise DataError(f"options: values must be plain data (numbers, strings, lists), got {value!r}") from None
    return value


_RAW: dict[tuple, tuple] = {}  # files read once per process, whatever split or subset is asked for later
_DATASETS: dict[tuple, Dataset] = {}
_ON_DEVICE: dict[tuple, Dataset] = {}


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                 val_fraction: float = 0.1, val_seed: int = 0, subset: int | None = None,
                 options: dict | None = None) -> Dataset:
    """Load a dataset by name, with its validation split; cached per process.

    Args:
        name: one of `DATASETS`.
        data_dir: where torchvision datasets live (see `resolve_data_dir`); other datasets ignore it.
        download: fetch mnist/fashion_mnist/cifar10 into data_dir when missing; never implicit.
        val_fraction: share of the training set held out for validation (stratified).
        val_seed: seed of the validation split; fixed so every trial and worker sees the same one.
        subset: keep only this many training images (stratified, after the validation split, so
            the validation set is the same whatever the subset).
        options: loader options: synthetic n/classes/channels/size/seed; folder path and the
            keyword arguments of `search.folder.load_folder`.

    Returns:
        The same `Dataset` object for the same arguments; files are read once per process.

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.in_shape, ds.num_classes, len(ds.test_y)
        ((1, 8, 8), 10, 359)
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (valid: {', '.join(DATASETS)})")
    options = dict(options or {})
    if options and name not in ("synthetic", "folder"):
        raise DataError(f"options: {name} takes no options, got {', '.join(map(repr, options))}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset <= 0):
        raise DataError(f"subset: expected a positive integer or nothing, got {subset!r}")
    root = resolve_data_dir(data_dir) if name in _USES_DATA_DIR else None
    if name == "folder" and "path" in options:
        options["path"] = str(resolve_folder_path(options["path"], data_dir))
    raw_key = (name, str(root), _freeze(options))
    key = (*raw_key, val_fraction, val_seed, subset)
    if key in _DATASETS:
        return _DATASETS[key]
    if raw_key not in _RAW:
        _RAW[raw_key] = _LOADERS[name](root, download, options)
    train_x, train_y, test_x, test_y, classes, *skipped = _RAW[raw_key]
    train_x, train_y, val_x, val_y = split_val(train_x, train_y, val_fraction, val_seed)
    mean, std = _PUBLISHED_STATS.get(name) or _channel_stats(train_x)
    if subset is not None:
        if subset > len(train_y):
            raise DataError(f"subset: {subset} is more than the {len(train_y)} training images of {name}")
        keep = _stratified_pick(train_y, subset, val_seed)
        train_x, train_y = train_x[keep], train_y[keep]
    ds = Dataset(name, train_x, train_y, val_x, val_y, test_x, test_y, tuple(mean), tuple(std), tuple(classes),
                 skipped=skipped[0] if skipped else 0)
    _DATASETS[key] = ds
    return ds


def dataset_for(cfg) -> Dataset:
    """The dataset a `RunConfig` asks for (cached like `load_dataset`)."""
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                        val_fraction=cfg.val_fraction, val_seed=cfg.val_seed, subset=cfg.subset,
                        options=cfg.data_options)


def to_device(ds: Dataset, device: torch.device | str) -> Dataset:
    """The dataset with every tensor on `device`, moved once per (dataset, device) and reused."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" and "cuda:0" must share one copy
        dev = torch.device("cuda", torch.cuda.current_device())
    if ds.train_x.device == dev:
        return ds
    key = (ds, str(dev))  # Dataset hashes by identity; holding it here keeps the key valid
    if key not in _ON_DEVICE:
        moved = {f: getattr(ds, f).to(dev) for f in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        _ON_DEVICE[key] = Dataset(ds.name, mean=ds.mean, std=ds.std, classes=ds.classes, skipped=ds.skipped,
                                  **moved)
    return _ON_DEVICE[key]


def clear_cache() -> None:
    """Forget every loaded dataset and device copy (tests; freeing memory between studies)."""
    _RAW.clear()
    _DATASETS.clear()
    _ON_DEVICE.clear()
