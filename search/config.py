"""RunConfig: everything one training run needs.

What `cnnsearch export` writes and `cnnsearch train` reads. Precedence, as in nanoGPT's
configurator: these defaults -> a config file (JSON or TOML) -> `--set key=value` flags.
Unknown keys are an error that names the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


from search.errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str = "digits"  # digits | synthetic | mnist | fashion_mnist | cifar10 | folder
    data_dir: str | None = None  # where datasets live; --data-dir and $CNNSEARCH_DATA beat it; None -> ./data
    download: bool = False  # fetch torchvision datasets when missing (never implicit)
    data_options: dict = field(default_factory=dict)  # loader-specific: folder path/size, synthetic shape
    val_fraction: float = 0.1  # validation split carved from the training set; the search scores on it
    val_seed: int = 0  # fixed so every trial and worker sees the same split
    subset: int | None = None  # use only this many training images (quick searches)

    # model
    model: str = "convnet"  # a name from models.list_models()
    model_params: dict = field(default_factory=dict)  # passed to the model's builder

    # optimisation
    optimizer: str = "adam"  # sgd | adam | adamw | rmsprop
    lr: float = 1e-3
    momentum: float = 0.0  # sgd and rmsprop only
    nesterov: bool = False  # sgd only; needs momentum > 0
    weight_decay: float = 0.0
    scheduler: str = "none"  # none | step | cosine | onecycle
    step_size: int = 10  # StepLR: epochs between decays
    step_gamma: float = 0.1  # StepLR: decay factor
    epochs: int = 10
    batch_size: int = 128
    label_smoothing: float = 0.0

    # augmentation, applied on the device to whole training batches
    flip: bool = False  # random horizontal flip (p=0.5); wrong for digits, right for photos
    crop_padding: int = 0  # padded random crop: pad by this many pixels, crop back to size
    erasing: float = 0.0  # random erasing probability (torchvision RandomErasing defaults otherwise)
    # evaluation (validation, test, predict) also sees each image mirrored and averages the two
    # logits: test-time flip, right where training flips (photos), wrong for digits
    tta_flip: bool = False

    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast where the hardware computes bf16 natively (CUDA; CPUs with AVX512-BF16
    # or AMX), fp32 elsewhere. fp32 forces full precision; bf16 asks for autocast everywhere.
    precision: str = "auto"  # auto | fp32 | bf16
    # torch.compile (inductor) for training and evaluation forward/backward: pays on long runs, compiles up front
    compile: bool = False
    # On CUDA, each full training batch's step (gather, augmentation, forward, backward, optimizer)
    # replays as one captured CUDA graph: a few microseconds of CPU a step instead of hundreds of
    # kernel launches (with rmsprop or one-cycle, the optimizer's update runs eager after each
    # replay). With compile = true it trains eager; on the CPU it does nothing.
    cuda_graph: bool = True
    warmup_epochs: int = 2  # validation accuracy still at chance after this many epochs -> diverged

    def replace(self, **changes: Any) -> "RunConfig":
        return from_dict({**to_dict(self), **changes})


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# The fields a study file sets in [data]: one dataset and split for every trial, never searched.
DATA_FIELDS = ("dataset", "data_dir", "download", "data_options", "val_fraction", "val_seed", "subset")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "step", "cosine", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")
SEED_LIMIT = 2**32  # seed and val_seed: 0 <= seed < 2**32, what numpy's and torch's generators all accept


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(key: str, value: Any) -> Any:
    """Check one value against the field's declared type; ints are accepted for floats."""
    kind = FIELDS[key].type
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{key}: expected {kind}, got nothing")
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif kind.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # JSON `--set lr=NaN` or `Infinity` parses; no setting means it
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
    elif kind.startswith("str"):
        if isinstance(value, str):
            return value
    elif kind == "dict":
        if isinstance(value, Mapping):
            return dict(value)
    raise ConfigError(f"{key}: expected {kind.replace(' | None', ' or null')}, got {value!r}")


def _check(cfg: RunConfig) -> RunConfig:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{key}: {why}, got {getattr(cfg, key)!r}")

    if cfg.optimizer not in OPTIMIZERS:
        raise bad("optimizer", f"expected one of {', '.join(OPTIMIZERS)}")
    if cfg.scheduler not in SCHEDULERS:
        raise bad("scheduler", f"expected one of {', '.join(SCHEDULERS)}")
    if cfg.precision not in PRECISIONS:
        raise bad("precision", f"expected one of {', '.join(PRECISIONS)}")
    for key in ("lr", "epochs", "batch_size", "step_size"):
        if getattr(cfg, key) <= 0:
            raise bad(key, "must be > 0")
    for key in ("momentum", "weight_decay", "crop_padding", "warmup_epochs"):
        if getattr(cfg, key) < 0:
            raise bad(key, "must be >= 0")
    for key in ("erasing", "label_smoothing"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise bad(key, "must be between 0 and 1")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise bad("val_fraction", "must be in [0, 1)")
    if not 0.0 < cfg.step_gamma <= 1.0:
        raise bad("step_gamma", "must be in (0, 1]")
    if cfg.subset is not None and cfg.subset <= 0:
        raise bad("subset", "must be > 0")
    for key in ("seed", "val_seed"):
        if not 0 <= getattr(cfg, key) < SEED_LIMIT:
            raise bad(key, "must be in [0, 2**32)")
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum <= 0):
        raise ConfigError("nesterov: needs optimizer 'sgd' with momentum > 0")
    return cfg


def from_dict(values: Mapping[str, Any], source: str = "") -> RunConfig:
    """Build a checked RunConfig; unknown keys and wrong types raise ConfigError naming the key."""
    where = f"{source}: " if source else ""
    kwargs = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(f"{where}unknown key {key!r} (valid keys: {', '.join(FIELDS)})")
        try:
            kwargs[key] = _coerce(key, value)
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
    try:
        return _check(RunConfig(**kwargs))
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


def parse_value(text: str) -> Any:
    """A `--set` value: JSON when it parses (numbers, true/false, null, lists, objects), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict. Dotted keys reach into dicts: `model_params.dropout=0.3`."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part} is not a table")
        node[leaf] = parse_value(text)
    return out


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: tables merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML file -> dict. An exported file keeps its config under "config"."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as err:
        raise ConfigError(f"{path}: cannot read ({err.__class__.__name__})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ConfigError(f"{path}: not valid {kind} ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return data.get("config", data) if isinstance(data.get("config"), dict) else data


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults -> file -> `--set` overrides, checked."""
    values: dict[str, Any] = read_file(path) if path else {}
    values = merge(values, parse_overrides(overrides or []))
    return from_dict(values, source=str(path) if path else "")
