"""The dataset registry: name -> `DatasetInfo`, filled by the `@register_dataset` decorator.

As with `models/_registry.py`, each dataset kind registers itself when its module is imported
(`search/datasets/__init__.py` imports them all), and everything else finds datasets only here.
An entry knows, without reading any image, the input shape and class count its options give,
so a model can be checked against the data before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from search.errors import DataError

# (root, download, options) -> (train_x, train_y, test_x, test_y, classes[, skipped[, skipped_line]])
Loader = Callable[[Path | None, bool, dict], tuple]


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()  # an option's default when the dataset cannot do without it


@dataclass(frozen=True)
class DatasetInfo:
    """What cnnsearch knows about one dataset kind before loading it.

    Attributes:
        name: the name users write in `RunConfig.dataset`.
        load: the loader, `load(root, download, options)` (see `Loader`); `options` are checked
            and complete, and `root` is the data directory when `uses_data_dir`, else None.
        shape: `shape(options) -> (C, H, W)` from checked, complete options.
        classes: `classes(options, root) -> int`; may list files (never decodes images) and raise
            DataError when they are missing.
        options: option name -> default, in the order error messages list them; `REQUIRED`
            marks an option without a default. Empty: the dataset takes no options.
        check: `check(options) -> options`, validating values of complete options (defaults
            filled in); None when any value goes.
        uses_data_dir: reads its files from the data directory (`resolve_data_dir`).
        path_options: options holding paths; relative ones are taken under the data directory.
        stats: published per-channel (mean, std) in [0, 1] units, or None to compute them from
            the training split.
        missing: `missing(options, root) -> str | None`: the first file the loader needs that
            is not under `root` (as a path relative to it), None when all are there; checked
            without reading any, so `create` can warn. None: the dataset reads no such files.
    """

    name: str
    load: Loader
    shape: Callable[[dict], tuple[int, int, int]]
    classes: Callable[[dict, Path | None], int]
    options: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict], dict] | None = None
    uses_data_dir: bool = False
    path_options: tuple[str, ...] = ()
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    missing: Callable[[dict, Path | None], str | None] | None = None


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, *, shape: Callable[[dict], tuple[int, int, int]],
                     classes: Callable[[dict, Path | None], int], options: Mapping[str, Any] | None = None,
                     check: Callable[[dict], dict] | None = None, uses_data_dir: bool = False,
                     path_options: tuple[str, ...] = (), stats: tuple | None = None,
                     missing: Callable[[dict, Path | None], str | None] | None = None
                     ) -> Callable[[Loader], Loader]:
    """Registers a dataset loader under `name`; the keyword arguments are `DatasetInfo`'s.

    Returns:
        A decorator that registers `load(root, download, options)` and returns it unchanged.

    Raises:
        ValueError: `name` is already registered (at import time, so two modules cannot
            silently fight over one name).

    Example:
        >>> @register_dataset("blank", shape=lambda o: (1, 4, 4), classes=lambda o, root: 2)  # doctest: +SKIP
        ... def _load(root, download, options):
        ...     x, y = torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
        ...     return x, y, x, y, ("a", "b")
    """

    def decorator(load: Loader) -> Loader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetInfo(name, load, shape, classes, dict(options or {}), check, uses_data_dir,
                                      tuple(path_options), stats, missing)
        return load

    return decorator


def names() -> tuple[str, ...]:
    """The registered dataset names, in registration order (the order error messages list them)."""
    return tuple(_DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    """The registry entry of `name`.

    Raises:
        DataError: `name` is not registered; the message lists the valid names.
    """
    if not isinstance(name, str) or name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r} (valid: {', '.join(_DATASETS)})")
    return _DATASETS[name]


def check_options(info: DatasetInfo, options: Mapping[str, Any] | None) -> dict:
    """`options` checked against `info`, with every default filled in.

    Raises:
        DataError: options for a dataset that takes none, an unknown option name (the message
            lists the valid ones), or a bad value (from `info.check`).
    """
    options = dict(options or {})
    if options and not info.options:
        raise DataError(f"options: {info.name} takes no options, got {', '.join(map(repr, options))}")
    unknown = sorted(set(options) - set(info.options), key=str)
    if unknown:
        raise DataError(f"options: unknown key {unknown[0]!r} for {info.name} (valid: {', '.join(info.options)})")
    # REQUIRED stays out, so `check` sees a missing option as missing and can say what it is for
    full = {k: v for k, v in info.options.items() if v is not REQUIRED} | options
    return info.check(full) if info.check is not None else full
