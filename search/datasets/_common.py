"""Datasets as whole uint8 tensors, loaded once per process, with a fixed validation split.

Every dataset comes back the same way: images uint8 [N, C, H, W], labels int64 [N], per-channel
mean/std in [0, 1] pixel units, and a validation split carved from the training set (stratified,
fixed seed) so the search never sees the test set. Loaders are found by name in the registry
(`_registry.py`); each returns (train_x, train_y, test_x, test_y, classes[, skipped[, skipped_line]]).

Normalisation stats: datasets that register published values (mnist, fashion_mnist, cifar10:
what hand-written training scripts use, so exported configs behave the same) use them; every
other dataset computes them from its training split after the validation split and before
`subset`, so the stats do not change with the subset size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from search.errors import DataError, DatasetNotFound

from ._registry import DatasetInfo, check_options, get_dataset_info


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
    skipped_line: str = ""  # one line saying how many and the first one why, for a warning; "" if none
    train_all: int = 0  # training images before `subset` (what a run without one trains on)

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


def choose_data_dir(flag: str | os.PathLike | None = None, stored: str | os.PathLike | None = None) -> str | None:
    """The data directory a command uses, one precedence for every command: its `--data-dir`
    (`flag`) > $CNNSEARCH_DATA > the config file's or the study's `data_dir` (`stored`) > None,
    which `resolve_data_dir` reads as ./data. Where the data lives is a property of the machine
    that runs the command, so this machine's flag and environment beat a path written in a file
    (or stored with a study) elsewhere.

    Example:
        >>> choose_data_dir("/flag", "/file")
        '/flag'
    """
    chosen = flag or os.environ.get("CNNSEARCH_DATA") or stored
    return str(chosen) if chosen else None


def not_found(name: str, root: Path, looked_for: str) -> DatasetNotFound:
    """The one error for a dataset whose files (`looked_for`, under `root`) are not there. Its
    hint works in every command that reads data: --data-dir is an option of train, predict,
    create, run, worker and launch; the download switch is named with the commands that take it
    (tests/test_datasets.py checks both against each command's --help)."""
    top = looked_for.split("/")[0]
    return DatasetNotFound(f"{name} not found in {root} (looked for {looked_for}); give --data-dir DIR (or "
                           f"CNNSEARCH_DATA=DIR) for the folder that holds {top}/, or let torchvision fetch it: "
                           "train --set download=true, create/run --set data.download=true")


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
    if val_fraction > 0 and len(y) and round(len(y) * val_fraction) == 0:  # every trial would crash on it
        raise DataError(f"val_fraction: {val_fraction} of {len(y)} images rounds to 0 validation images; "
                        f"use at least {1 / len(y):.2g}, or 0 for no validation split")
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


def _torchvision(name: str, tv_class: Callable, root: Path, download: bool) -> list:
    """(train, test) torchvision datasets; its assorted errors (network, md5) become one DataError line."""
    try:
        return [tv_class(str(root), train=train, download=download) for train in (True, False)]
    except Exception as err:
        reason = " ".join(str(err).split())
        raise DataError(f"{name}: torchvision could not {'download' if download else 'read'} it in {root} "
                        f"({reason}); delete partial files and retry, or give --data-dir DIR (or CNNSEARCH_DATA=DIR) "
                        "naming a folder that holds it") from err


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


def _options(info: DatasetInfo, options: dict | None, data_dir: str | os.PathLike | None) -> dict:
    """Checked, complete options; relative paths resolved, so the cache key names the real folder."""
    options = check_options(info, options)
    for key in info.path_options:
        if key in options:
            if not isinstance(options[key], str) or not options[key].strip():  # a list, a number, "": no path
                raise DataError(f"options.{key}: expected a path (a non-empty string), got {options[key]!r}")
            options[key] = str(resolve_folder_path(options[key], data_dir))
    return options


def describe(name: str, options: dict | None = None,
             data_dir: str | os.PathLike | None = None) -> tuple[tuple[int, int, int], int]:
    """A dataset's input shape and class count, without loading (or decoding) its images.

    Args:
        name: a registered dataset name (see `names`).
        options: the dataset's options, as for `load_dataset`.
        data_dir: the data directory, as for `load_dataset`.

    Returns:
        ((channels, height, width), number of classes), as the loaded `Dataset` will have them.

    Raises:
        DataError: an unknown dataset or option name, a bad option value, or (folder) a
            missing or malformed image folder.

    Example:
        >>> describe("synthetic", {"channels": 3, "size": 12, "classes": 4})
        ((3, 12, 12), 4)
    """
    info = get_dataset_info(name)
    options = _options(info, options, data_dir)
    root = resolve_data_dir(data_dir) if info.uses_data_dir else None
    return tuple(info.shape(options)), int(info.classes(options, root))


def missing_files(name: str, options: dict | None = None, data_dir: str | os.PathLike | None = None) -> str | None:
    """One line saying which of the dataset's files are not on this machine, or None when none
    are missing (or the dataset reads no files from the data directory). Reads no file.

    Example:
        >>> missing_files("mnist", data_dir="/nowhere")
        'mnist not found in /nowhere (looked for MNIST/raw/train-images-idx3-ubyte[.gz])'
    """
    info = get_dataset_info(name)
    if info.missing is None or not info.uses_data_dir:
        return None
    root = resolve_data_dir(data_dir)
    absent = info.missing(_options(info, options, data_dir), root)
    return None if absent is None else f"{name} not found in {root} (looked for {absent})"


_RAW: dict[tuple, tuple] = {}  # files read once per process, whatever split or subset is asked for later
_DATASETS: dict[tuple, Dataset] = {}
_ON_DEVICE: dict[tuple, Dataset] = {}


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                 val_fraction: float = 0.1, val_seed: int = 0, subset: int | None = None,
                 options: dict | None = None) -> Dataset:
    """Load a dataset by name, with its validation split; cached per process.

    Args:
        name: a registered dataset name (see `names`).
        data_dir: where torchvision datasets live (see `resolve_data_dir`); other datasets ignore it.
        download: fetch mnist/fashion_mnist/cifar10 into data_dir when missing; never implicit.
        val_fraction: share of the training set held out for validation (stratified).
        val_seed: seed of the validation split; fixed so every trial and worker sees the same one.
        subset: keep only this many training images (stratified, after the validation split, so
            the validation set is the same whatever the subset).
        options: loader options: synthetic n/classes/channels/size/seed; folder path and the
            keyword arguments of `search.datasets.folder.load_folder`.

    Returns:
        The same `Dataset` object for the same arguments; files are read once per process.

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.in_shape, ds.num_classes, len(ds.test_y)
        ((1, 8, 8), 10, 359)
    """
    info = get_dataset_info(name)
    options = _options(info, options, data_dir)
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset <= 0):
        raise DataError(f"subset: expected a positive integer or nothing, got {subset!r}")
    root = resolve_data_dir(data_dir) if info.uses_data_dir else None
    raw_key = (name, str(root), _freeze(options))
    key = (*raw_key, val_fraction, val_seed, subset)
    if key in _DATASETS:
        return _DATASETS[key]
    if raw_key not in _RAW:
        _RAW[raw_key] = info.load(root, download, options)
    train_x, train_y, test_x, test_y, classes, *skipped = _RAW[raw_key]  # [skipped[, skipped_line]]
    train_x, train_y, val_x, val_y = split_val(train_x, train_y, val_fraction, val_seed)
    mean, std = info.stats or _channel_stats(train_x)
    train_all = len(train_y)
    if subset is not None:
        if subset > len(train_y):
            raise DataError(f"subset: {subset} is more than the {len(train_y)} training images of {name}")
        keep = _stratified_pick(train_y, subset, val_seed)
        train_x, train_y = train_x[keep], train_y[keep]
    ds = Dataset(name, train_x, train_y, val_x, val_y, test_x, test_y, tuple(mean), tuple(std), tuple(classes),
                 skipped=skipped[0] if skipped else 0, skipped_line=skipped[1] if len(skipped) > 1 else "",
                 train_all=train_all)
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
                                  skipped_line=ds.skipped_line, train_all=ds.train_all,
                                  **moved)
    return _ON_DEVICE[key]


def clear_cache() -> None:
    """Forget every loaded dataset and device copy (tests; freeing memory between studies)."""
    _RAW.clear()
    _DATASETS.clear()
    _ON_DEVICE.clear()
