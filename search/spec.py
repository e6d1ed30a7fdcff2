"""Study files (TOML) -> a validated, frozen StudySpec.

Everything is checked here, before anything touches storage, and every problem is one line
naming the file and the key: `studies/x.toml: space.lr.low: must be > 0 when log = true, got 0`.
The spec round-trips through JSON (`spec_to_dict` / `spec_from_dict`) so it can live in the
study's user attrs and workers need no file. See studies/*.toml for the format.

`load_spec` also checks the file's models against its data (`search/check.py`: every model the
study is sure to meet, built on the meta device); `spec_from_dict` checks the file's contents
only, so a stored spec loads on any machine, with or without the data.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import optuna

from . import check, config, objectives
from .errors import SpecError, first_line
from .objectives import LEARNED, Objective, objective, parse_objectives
from .config import DATA_FIELDS
from .space import (Param, SpaceError, apply_params, check_space, contains, corner_params, fill_params, is_active,
                    parse_param, split_target, suggest_params)

SECTIONS = ("study", "data", "fixed", "space", "sampler", "pruner", "enqueue", "final", "warm_start")
FINAL_KEYS = ("finalists", "epochs", "full_data", "stretch_schedule", "seeds", "average_last", "baseline", "pick",
              "variants")
WARM_START_KEYS = ("study", "top")
STUDY_KEYS = ("name", "direction", "metric", "objectives", "directions", "n_trials", "timeout", "description",
              "max_params", "max_memory", "max_macs", "max_latency_ms", "latency_batch")
LATENCY_BATCH = 64  # study.latency_batch default: images per timed forward pass
FIXED_FIELDS = tuple(f for f in config.FIELDS if f not in DATA_FIELDS)
_STUDY_NAME = re.compile(r"[A-Za-z0-9_-]+")
SEEDS = 2**32  # sampler seeds are in [0, SEEDS): what NumPy's RandomState takes


class _Invalid(SpecError):
    """`<key>: <what>`; spec_from_dict prefixes the file name (or source) and re-raises it as SpecError."""


@dataclass(frozen=True)
class ClassSpec:
    """An Optuna sampler or pruner: a class name in optuna.samplers / optuna.pruners and its kwargs."""

    name: str
    kwargs: dict


@dataclass(frozen=True)
class FinalSpec:
    """The study's final stage (`[final]`): what the workers do once the search budget is spent.

    The `finalists` best completed trials (and the study's first `baseline` `[[enqueue]]`
    entries, the starts it was given) are each trained at the final budget without reading the test
    split; the one with the best validation metric, averaged over its last `average_last`
    epochs, is then trained over `seeds` seeds, the test split read once per seed
    (search/finalstage.py).
    """

    finalists: int = 3
    epochs: int | None = None  # None: the search's own epochs
    full_data: bool = True  # the whole training set instead of the search's data.subset
    stretch_schedule: bool = True  # StepLR's step_size scaled to the new epochs (cosine, onecycle follow epochs anyway)
    seeds: int = 3
    average_last: int = 1  # the choice: validation metric averaged over this many last epochs
    # How many of the first [[enqueue]] entries (the starts the study was given) are always
    # finalists (with `pick`: if no larger): true is 1, false 0. Short trials rank a start that
    # pays only late (augmentation, a long schedule) low; as a finalist it is judged at the final budget.
    baseline: int = 1
    # Several objectives: the Pareto trial the stage starts from (objectives.pick: "knee" or
    # "max_params=300000"); the finalists are it and the best front trials no larger than it.
    # A list in the study file (pick = ["max_params=20000", "knee"]) trains each pick's own
    # finalists and seeds: `pick` is the first rule (the study's final model), `more_picks` the rest.
    pick: str | None = None
    more_picks: tuple[str, ...] = ()
    # Each search finalist is also trained with each of these parameter overrides (a "twin", say
    # flip and padded crop): what pays only over a long run, as augmentation does, is judged at
    # the final budget instead of by short trials. Only parameters nothing depends on and that
    # leave the network as it is: a twin has its source trial's size and latency.
    variants: tuple[dict, ...] = ()

    @property
    def picks(self) -> tuple[str, ...]:
        """Every pick rule, the study's own (first) first; () in a single-objective study."""
        return (self.pick, *self.more_picks) if self.pick is not None else ()


@dataclass(frozen=True)
class WarmStart:
    """`[warm_start]`: enqueue another study's `top` best configurations, once, at create."""

    study: str
    top: int = 3


@dataclass(frozen=True)
class StudySpec:
    """A validated study. `data` and `fixed` are RunConfig values; `space` is in dependency order."""

    name: str
    objectives: tuple[Objective, ...]  # study.metric/direction (one), or study.objectives: one learned, any static
    n_trials: int  # global budget: complete + pruned trials across all workers
    timeout: float | int | None
    description: str
    data: dict
    fixed: dict
    space: tuple[Param, ...]
    sampler: ClassSpec
    pruner: ClassSpec
    enqueue: tuple[dict, ...]  # configurations to try first, by parameter name
    max_params: int = check.MAX_PARAMS  # no model of the study may have more trainable parameters
    max_memory: int = check.MAX_MEMORY  # bytes: estimated activation memory of one training batch
    final: FinalSpec | None = None  # None: the study ends with its search (no [final] section)
    warm_start: WarmStart | None = None
    max_macs: int | None = None  # per trial: a model over it is not trained (search/costs.py)
    max_latency_ms: float | None = None  # per trial: ms per image, measured on the worker's device
    latency_batch: int = LATENCY_BATCH  # images per timed forward pass (latency_ms)

    @property
    def learned(self) -> Objective:
        """The study's learned objective (what trials report each epoch)."""
        return next(o for o in self.objectives if o.learned)

    @property
    def metric(self) -> str:
        return self.learned.name

    @property
    def direction(self) -> str:
        return self.learned.direction

    @property
    def multi(self) -> bool:
        """Several objectives: trials return a value each, and rank by the Pareto front."""
        return len(self.objectives) > 1

    @property
    def starts(self) -> tuple[dict, ...]:
        """The [[enqueue]] entries that are always finalists: the first `final.baseline` of them
        (true: the first, if any); () without a [final] section."""
        return self.enqueue[:self.final.baseline] if self.final is not None else ()

    @property
    def limits(self) -> tuple[tuple[str, float], ...]:
        """The per-trial constraints, (static metric, limit) in a fixed order: what a trial over
        one is not trained for (`costs.violations`); max_params caps the whole study at create."""
        return tuple((metric, limit) for metric, limit in (("macs", self.max_macs),
                                                           ("latency_ms", self.max_latency_ms)) if limit is not None)


def load_spec(path: str | Path, overrides: list[str] | None = None, data_dir: str | None = None) -> StudySpec:
    """Reads and validates a study file.

    Args:
        path: the study file.
        overrides: `section.key=value` changes applied before validation (values parsed as
            JSON, else strings), e.g. `study.n_trials=12`, `data.subset=10000`, `fixed.epochs=4`:
            a shipped study at a smaller budget without editing the file.
        data_dir: this machine's data directory (a command's --data-dir), for the checks only
            (see `with_data_dir`); the spec returned keeps the file's data.data_dir.

    Raises:
        SpecError: the file is missing, not TOML, anything in it is invalid, or a model it is sure
            to meet does not build against the data, or is over study.max_params or max_memory
            (one line).
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read ({err.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML ({err})") from None
    if overrides:
        starts = [o for o in overrides if _START_KEY.match(o)]
        try:
            doc = config.merge(doc, config.parse_overrides([o for o in overrides if o not in starts]))
        except config.ConfigError as err:
            raise SpecError(f"{path}: {err}") from None
        doc = _set_starts(doc, starts, path)
    spec = spec_from_dict(doc, source=str(path))
    try:
        check.check_spec(with_data_dir(spec, data_dir))
    except SpecError as err:
        raise SpecError(f"{path}: {_printable(str(err))}") from None
    return spec


def with_data_dir(spec: StudySpec, data_dir: str | None = None) -> StudySpec:
    """The spec as this machine runs it: data.data_dir chosen by `datasets.choose_data_dir`
    (`data_dir`, a command's --data-dir > $CNNSEARCH_DATA > the spec's own > ./data). The data
    directory belongs to the machine, not the study: workers use this copy, and the stored spec
    keeps what the study file said.
    """
    from .datasets import choose_data_dir  # loads torch: only when a command gets this far

    chosen = choose_data_dir(data_dir, spec.data.get("data_dir"))
    if chosen == spec.data.get("data_dir"):
        return spec
    return dataclasses.replace(spec, data={**spec.data, "data_dir": chosen})


_START_KEY = re.compile(r"enqueue\[(\d+)\]\.([^.=\[]+)=(.*)", re.S)


def _set_starts(doc: dict, pairs: list[str], path: Path) -> dict:
    """`--set enqueue[0].step_size=4`: one key of one [[enqueue]] start (null removes it, leaving
    it to the sampler), so that a study cut to shorter trials can cut its start's step too."""
    if not pairs:
        return doc
    doc = copy.deepcopy(doc)
    entries = doc.get("enqueue", [])
    for pair in pairs:
        m = _START_KEY.match(pair)
        index, key, value = int(m[1]), m[2], config.parse_value(m[3])
        if not isinstance(entries, list) or index >= len(entries) or not isinstance(entries[index], dict):
            n = len(entries) if isinstance(entries, list) else 0
            raise SpecError(f"{path}: --set {pair!r}: the study has {n} [[enqueue]] "
                            f"{'entry' if n == 1 else 'entries'} (enqueue[0] is the first)")
        if value is None:
            entries[index].pop(key, None)
        else:
            entries[index][key] = value
    return doc


def spec_from_dict(doc: Mapping[str, Any], source: str = "stored spec", *, validate: bool = True) -> StudySpec:
    """Validates a study given as a dict (a parsed study file, or `spec_to_dict` output).

    `validate=False` is for a spec this program stored after validating it (`study.load` for
    status, best, export, report): its layout is checked and the dataclasses rebuilt, but its
    names and values are not checked again against the models, the datasets and Optuna, which
    would import torch and run a trial of the sampler: seconds, for a command that reads.
    """
    try:
        return _parse(doc) if validate else _rebuild(doc)
    except (_Invalid, SpaceError) as err:
        raise SpecError(f"{source}: {_printable(str(err))}") from None


def _rebuild(doc: Mapping[str, Any]) -> StudySpec:
    """A stored (already validated) spec as a StudySpec: the same dataclasses `_parse` makes,
    equal to them for the same dict, from the cheap checks only (no torch, no trial)."""
    doc = copy.deepcopy(dict(doc))
    unknown = [k for k in doc if k not in SECTIONS]
    if unknown:
        raise _Invalid(f"{unknown[0]}: unknown section (valid: {', '.join(SECTIONS)})")
    head = _parse_study(_table(doc, "study", _study_keys(doc)))
    data, fixed = _table(doc, "data"), _table(doc, "fixed")
    space = check_space([parse_param(name, table, fixed) for name, table in _table(doc, "space").items()])
    by_name = {p.name: p for p in space}
    enqueue = tuple({k: float(v) if k in by_name and by_name[k].type == "float" else v for k, v in entry.items()}
                    for entry in _list(doc, "enqueue"))
    classes = {}
    for section, default in (("sampler", "TPESampler"), ("pruner", "MedianPruner")):
        table = _table(doc, section, ("name", "kwargs"))
        classes[section] = ClassSpec(name=table.get("name", default), kwargs=dict(table.get("kwargs", {})))
    return StudySpec(**head, data=data, fixed=fixed, space=space, enqueue=enqueue, **classes,
                     final=_parse_final(doc, enqueue, head, space), warm_start=_parse_warm_start(doc, head["name"]))


def _printable(text: str) -> str:
    """Keys are echoed as the file spells them; a line break in one must not split the message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def spec_to_dict(spec: StudySpec) -> dict[str, Any]:
    """The spec as JSON-ready data in the study-file layout; equal specs give equal dicts."""
    if spec.multi:
        study = {"name": spec.name, "objectives": [o.name for o in spec.objectives], "n_trials": spec.n_trials,
                 "description": spec.description}
    else:
        study = {"name": spec.name, "direction": spec.direction, "metric": spec.metric, "n_trials": spec.n_trials,
                 "description": spec.description}
    if spec.timeout is not None:
        study["timeout"] = spec.timeout
    for key, default in (("max_params", check.MAX_PARAMS), ("max_memory", check.MAX_MEMORY)):
        if getattr(spec, key) != default:  # defaults left out: specs stored before these keys compare equal
            study[key] = getattr(spec, key)
    for key, default in (("max_macs", None), ("max_latency_ms", None), ("latency_batch", LATENCY_BATCH)):
        if getattr(spec, key) != default:
            study[key] = getattr(spec, key)
    return copy.deepcopy({
        "study": study, "data": spec.data, "fixed": spec.fixed,
        "space": {p.name: _param_to_dict(p) for p in spec.space},
        "sampler": {"name": spec.sampler.name, "kwargs": spec.sampler.kwargs},
        "pruner": {"name": spec.pruner.name, "kwargs": spec.pruner.kwargs},
        "enqueue": list(spec.enqueue),
        # left out when absent: specs stored before these sections compare equal
        **({"final": _final_to_dict(spec.final)} if spec.final is not None else {}),
        **({"warm_start": dataclasses.asdict(spec.warm_start)} if spec.warm_start is not None else {})})


def _final_to_dict(final: FinalSpec) -> dict:
    """[final] as the study file writes it: `pick` left out when None (specs stored before it
    compare equal), a list when there are several."""
    out = {k: v for k, v in dataclasses.asdict(final).items() if k not in ("pick", "more_picks", "variants")}
    if final.pick is not None:
        out["pick"] = list(final.picks) if final.more_picks else final.pick
    if final.variants:  # left out when none: specs stored before variants compare equal
        out["variants"] = [dict(v) for v in final.variants]
    return out


def make_sampler(spec: StudySpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler; a `seed` kwarg is shifted by `seed_offset` so each worker draws differently."""
    kwargs = copy.deepcopy(spec.sampler.kwargs)
    if "seed" in kwargs:
        kwargs["seed"] = (kwargs["seed"] + seed_offset) % SEEDS  # a pid added to a seed near 2**32 stays a seed
    cls = getattr(optuna.samplers, spec.sampler.name)
    if (spec.limits and not hasattr(optuna.Trial, "set_constraint")
            and "constraints_func" in inspect.signature(cls).parameters):
        # Optuna < 5: the sampler reads the constraints the objective records (costs.record_constraints);
        # from 5.0 on, constraints_func is deprecated and the objective's set_constraint informs the sampler
        default = [0.0] * len(spec.limits)
        kwargs["constraints_func"] = lambda t: t.user_attrs.get("constraints", default)
    return cls(**kwargs)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner (NopPruner prunes nothing)."""
    return getattr(optuna.pruners, spec.pruner.name)(**copy.deepcopy(spec.pruner.kwargs))


def _param_to_dict(p: Param) -> dict[str, Any]:
    out: dict[str, Any] = {"type": p.type, "target": p.target}
    if p.type == "categorical":
        out["choices"] = list(p.choices)
    else:
        out.update(low=p.low, high=p.high, log=p.log)
        if p.step is not None:
            out["step"] = p.step
    if p.when:
        out["when"] = {name: list(values) for name, values in p.when}
    return out


def _table(doc: Mapping[str, Any], key: str, valid: tuple[str, ...] | None = None) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, Mapping):
        raise _Invalid(f"{key}: expected a table, got {value!r}")
    unknown = [k for k in value if valid is not None and k not in valid]
    if unknown:
        raise _Invalid(f"{key}.{unknown[0]}: unknown key (valid: {', '.join(valid)})")
    return dict(value)


def _parse(doc: Mapping[str, Any]) -> StudySpec:
    doc = copy.deepcopy(dict(doc))  # the spec must not share lists or tables with the caller
    unknown = [k for k in doc if k not in SECTIONS]
    if unknown:
        raise _Invalid(f"{unknown[0]}: unknown section (valid: {', '.join(SECTIONS)})")
    head = _parse_study(_table(doc, "study", _study_keys(doc)))
    data, fixed = _table(doc, "data"), _table(doc, "fixed")
    for section, table, other, fields in (("data", data, "fixed", DATA_FIELDS), ("fixed", fixed, "data", FIXED_FIELDS)):
        for key in table:
            if key in config.FIELDS and key not in fields:
                raise _Invalid(f"{section}.{key}: belongs in [{other}]")
            if key not in fields:
                raise _Invalid(f"{section}.{key}: unknown key (valid: {', '.join(fields)})")
            _check_plain(f"{section}.{key}", table[key])
    if not isinstance(fixed.get("model_params", {}), Mapping):
        raise _Invalid(f"fixed.model_params: expected a table, got {fixed['model_params']!r}")
    _check_names(data, fixed)

    space_table = _table(doc, "space")
    if not space_table:
        raise _Invalid("space: expected at least one parameter, like [space.lr]")
    space = check_space([parse_param(name, table, fixed) for name, table in space_table.items()])
    _check_model_choices(space)
    base = {**data, **fixed}
    for param, _, params in corner_params(space):
        _check_config(base, space, params, param)
    enqueue = tuple(_parse_enqueued(i, entry, space, base) for i, entry in enumerate(_list(doc, "enqueue")))

    spec = StudySpec(**head, data=data, fixed=fixed, space=space,
                     sampler=_class_spec(doc, "sampler", optuna.samplers, optuna.samplers.BaseSampler, "TPESampler"),
                     pruner=_class_spec(doc, "pruner", optuna.pruners, optuna.pruners.BasePruner, "MedianPruner"),
                     enqueue=enqueue, final=_parse_final(doc, enqueue, head, space),
                     warm_start=_parse_warm_start(doc, head["name"]))
    _check_sampling(spec)
    return spec


def _parse_study(study: Mapping[str, Any]) -> dict[str, Any]:
    name = study.get("name")
    if not isinstance(name, str) or not _STUDY_NAME.fullmatch(name):
        raise _Invalid(f"study.name: expected letters, digits, _ and -, got {name!r}")
    try:
        if "objectives" in study:
            given = [k for k in ("metric", "direction") if k in study]
            if given:
                raise _Invalid(f"study.{given[0]}: give study.objectives (and directions) or study.metric "
                               "(and direction), not both")
            goals = parse_objectives(study["objectives"], study.get("directions"))
        elif "directions" in study:
            raise _Invalid("study.directions: goes with study.objectives (a list of metrics); "
                           "one objective takes study.direction")
        else:
            goals = (objective(study.get("metric", "val_acc"), study.get("direction")),)
    except SpecError as err:
        raise _Invalid(str(err)) from None
    n_trials, timeout = study.get("n_trials"), study.get("timeout")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise _Invalid(f"study.n_trials: expected an integer >= 1, got {n_trials!r}")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                or not 0 < timeout < math.inf):  # nan is no number of seconds either
        raise _Invalid(f"study.timeout: expected seconds > 0, got {timeout!r}")
    max_params = study.get("max_params", check.MAX_PARAMS)
    if not isinstance(max_params, int) or isinstance(max_params, bool) or max_params < 1:
        raise _Invalid(f"study.max_params: expected an integer >= 1, got {max_params!r}")
    max_memory = check.parse_bytes(study.get("max_memory", check.MAX_MEMORY))
    if max_memory is None:
        raise _Invalid(f"study.max_memory: expected a number of bytes >= 1, like 8589934592 or \"8GiB\", "
                       f"got {study['max_memory']!r}")
    description = study.get("description", "")
    if not isinstance(description, str):
        raise _Invalid(f"study.description: expected a string, got {description!r}")
    limits = {}
    for key in ("max_macs", "max_latency_ms"):
        value = study.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not 0 < value < math.inf):
            raise _Invalid(f"study.{key}: expected a number > 0, got {value!r}")
        limits[key] = value
    if limits["max_macs"] is not None:
        limits["max_macs"] = int(limits["max_macs"])  # 3e6 in TOML is a float
    latency_batch = _int_key(study, "study", "latency_batch", LATENCY_BATCH)
    return dict(name=name, objectives=goals, n_trials=n_trials, timeout=timeout, description=description,
                max_params=max_params, max_memory=max_memory, **limits, latency_batch=latency_batch)


def _study_keys(doc: Mapping[str, Any]) -> tuple[str, ...]:
    """STUDY_KEYS; a limit on a learned metric (study.max_val_loss) is its own one line."""
    study = doc.get("study")
    for key in study if isinstance(study, Mapping) else ():
        metric = key.partition("_")[2] if isinstance(key, str) and key.startswith(("max_", "min_")) else None
        if metric in LEARNED:
            raise _Invalid(f"study.{key}: constraints apply to static metrics only (max_params, max_macs, "
                           f"max_latency_ms); {metric} is learned, known only after training")
    return STUDY_KEYS


def _int_key(table: Mapping[str, Any], section: str, key: str, default: Any, low: int = 1) -> Any:
    value = table.get(key, default)
    if value is default:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _Invalid(f"{section}.{key}: expected an integer >= {low}, got {value!r}")
    return value


def _bool_key(table: Mapping[str, Any], section: str, key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise _Invalid(f"{section}.{key}: expected true or false, got {value!r}")
    return value


def _starts_key(table: Mapping[str, Any], enqueue: tuple[dict, ...]) -> int:
    """`final.baseline`: true (1) or false (0), or how many of the first [[enqueue]] entries."""
    value = table.get("baseline", True)
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise _Invalid(f"final.baseline: expected true, false or a number of [[enqueue]] entries, got {value!r}")
    if value > max(1, len(enqueue)):  # 1, like true, is "the start, if the study has one"
        raise _Invalid(f"final.baseline: {value} starts asked for, the study has "
                       f"{len(enqueue)} [[enqueue]] {'entry' if len(enqueue) == 1 else 'entries'}")
    return value


def _parse_pick(rule: Any, objectives_: tuple[Objective, ...]) -> tuple[str, ...]:
    """`final.pick`: one rule or a list of them; ("knee",) by default in a multi-objective study,
    () in a single-objective one (where a pick is refused)."""
    if len(objectives_) == 1:
        if rule is not None:
            raise _Invalid(f"final.pick: {rule!r} picks from a Pareto front; this study has one objective "
                           f"({objectives_[0].name}), its finalists are its best trials")
        return ()
    rules = ["knee" if rule is None else rule] if not isinstance(rule, list) else rule
    if not rules:
        raise _Invalid("final.pick: an empty list; give one rule (knee, max_params=300000) or several")
    static = [o.name for o in objectives_ if not o.learned]
    out: list[str] = []
    seen: set = set()
    for one in rules:
        try:
            parsed = objectives.parse_pick(one)
        except ValueError as exc:
            raise _Invalid(f"final.pick: {exc}") from None
        if parsed is not None and parsed[0] not in static:
            raise _Invalid(f"final.pick: {one.strip()} limits {parsed[0]}, which is not one of the study's "
                           f"objectives ({', '.join(o.name for o in objectives_)})")
        if parsed in seen:
            raise _Invalid(f"final.pick: {one.strip()} is listed twice")
        seen.add(parsed)
        out.append(one.strip())
    return tuple(out)


def _parse_variants(value: Any, space: tuple[Param, ...]) -> tuple[dict, ...]:
    """`final.variants`: a list of tables of parameter overrides. Each key is a parameter of the
    space that no `when` names and that has no `when` itself (a twin of any finalist is then a
    point of the space), that does not build the network (model, model_params: a twin keeps its
    source trial's size), and each value is one the parameter can take."""
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise _Invalid(f"final.variants: expected a list of tables like [{{ flip = true }}], got {value!r}")
    by_name = {p.name: p for p in space}
    out = []
    for i, variant in enumerate(value):
        where = f"final.variants[{i}]"
        if not variant:
            raise _Invalid(f"{where}: an empty table; give the parameters the twin changes, like {{ flip = true }}")
        for name, v in variant.items():
            p = _param_value(f"{where}.{name}", by_name, name, v)
            if p.when:
                raise _Invalid(f"{where}.{name}: applies only when "
                               f"{', '.join(f'{o} in {list(a)}' for o, a in p.when)}; a variant sets only "
                               "parameters that always apply")
            depends = [q.name for q in space if any(o == name for o, _ in q.when)]
            if depends:
                raise _Invalid(f"{where}.{name}: {', '.join(depends)} depends on it; a variant sets only "
                               "parameters nothing depends on")
            field = split_target(p.target)[0]
            if field in ("model", "model_params"):
                raise _Invalid(f"{where}.{name}: sets {p.target}, the network itself; a variant changes how a "
                               "finalist trains, not its network")
            if field == "epochs":
                raise _Invalid(f"{where}.{name}: sets epochs; the final budget is final.epochs")
        entry = {k: float(v) if by_name[k].type == "float" else v for k, v in variant.items()}
        if entry in out:
            raise _Invalid(f"{where}: the same as final.variants[{out.index(entry)}]")
        out.append(entry)
    return tuple(out)


def _parse_final(doc: Mapping[str, Any], enqueue: tuple[dict, ...], head: Mapping[str, Any],
                 space: tuple[Param, ...]) -> FinalSpec | None:
    if "final" not in doc:
        return None
    table = _table(doc, "final", FINAL_KEYS)
    picks = _parse_pick(table.get("pick"), head["objectives"])
    d = FinalSpec()
    final = FinalSpec(finalists=_int_key(table, "final", "finalists", d.finalists),
                      epochs=_int_key(table, "final", "epochs", d.epochs),
                      full_data=_bool_key(table, "final", "full_data", d.full_data),
                      stretch_schedule=_bool_key(table, "final", "stretch_schedule", d.stretch_schedule),
                      seeds=_int_key(table, "final", "seeds", d.seeds),
                      average_last=_int_key(table, "final", "average_last", d.average_last),
                      baseline=_starts_key(table, enqueue),
                      pick=picks[0] if picks else None, more_picks=picks[1:],
                      variants=_parse_variants(table.get("variants", []), space))
    epochs = final.epochs
    if epochs is not None and final.average_last > epochs:
        raise _Invalid(f"final.average_last: {final.average_last} epochs, more than the final "
                       f"budget of {epochs} epochs")
    return final


def _parse_warm_start(doc: Mapping[str, Any], name: str) -> WarmStart | None:
    if "warm_start" not in doc:
        return None
    table = _table(doc, "warm_start", WARM_START_KEYS)
    other = table.get("study")
    if not isinstance(other, str) or not _STUDY_NAME.fullmatch(other):
        raise _Invalid(f"warm_start.study: expected a study name (letters, digits, _ and -), got {other!r}")
    if other == name:
        raise _Invalid(f"warm_start.study: {other!r} is this study itself")
    return WarmStart(study=other, top=_int_key(table, "warm_start", "top", WarmStart.top))


def _check_plain(key: str, value: Any) -> None:
    """Only JSON-like values, so the spec survives the trip through the study's user attrs."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(f"{key}[{i}]", v)
    elif (value is not None and not isinstance(value, (str, int, float, bool))
          or isinstance(value, float) and not math.isfinite(value)):  # JSON has no NaN or infinities
        raise _Invalid(f"{key}: expected a string, finite number, boolean, list or table, got {value!r}")


def _check_names(data: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
    from models import list_models  # lazy: loading torch is only worth it once the file parses
    from .datasets import names as dataset_names  # the registry as it is now, later registrations included

    dataset = data.get("dataset", config.RunConfig.dataset)
    if dataset not in dataset_names():
        raise _Invalid(f"data.dataset: unknown dataset {dataset!r} (valid: {', '.join(dataset_names())})")
    model = fixed.get("model", config.RunConfig.model)
    if model not in list_models():
        raise _Invalid(f"fixed.model: unknown model {model!r} (valid: {', '.join(list_models())})")


def _check_model_choices(space: tuple[Param, ...]) -> None:
    from models import list_models

    for p in space:
        if p.target == "model":
            bad = [c for c in p.choices if c not in list_models()]
            if bad:
                raise _Invalid(f"space.{p.name}.choices: unknown model {bad[0]!r} (valid: {', '.join(list_models())})")


def _check_config(base: Mapping[str, Any], space: tuple[Param, ...], params: dict[str, Any],
                  param: Param | None) -> None:
    """from_dict on one point of the space; the error is blamed on the parameter or the fixed key that made it."""
    try:
        config.from_dict(apply_params(base, space, params))
    except config.ConfigError as err:
        key, _, why = str(err).partition(": ")
        writers = [p for p in space if p.name in params and split_target(p.target)[0] == key]
        blamed = param if param is not None and param in writers else (writers[0] if writers else None)
        if blamed is None:
            raise _Invalid(f"{'data' if key in DATA_FIELDS else 'fixed'}.{key}: {why}") from None
        raise _Invalid(f"space.{blamed.name}: {params[blamed.name]!r} makes an invalid config ({err})") from None


def _list(doc: Mapping[str, Any], key: str) -> list:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise _Invalid(f"{key}: expected [[{key}]] tables, got {value!r}")
    return value


def _param_value(where: str, by_name: Mapping[str, Param], name: str, value: Any) -> Param:
    """The parameter `name`, checked to be one of the space's and to take `value`."""
    p = by_name.get(name)
    if p is None:
        raise _Invalid(f"{where}: no such parameter (parameters: {', '.join(by_name)})")
    if not contains(p, value):
        allowed = list(p.choices) if p.type == "categorical" else f"{p.type} in [{p.low}, {p.high}]"
        raise _Invalid(f"{where}: {value!r} is outside the space ({allowed})")
    return p


def _parse_enqueued(i: int, entry: Mapping[str, Any], space: tuple[Param, ...], base: Mapping[str, Any]) -> dict:
    by_name = {p.name: p for p in space}
    out: dict[str, Any] = {}
    for name, value in entry.items():
        where = f"enqueue[{i}].{name}"
        p = _param_value(where, by_name, name, value)
        for other, allowed in p.when:
            if other not in entry:
                raise _Invalid(f"{where}: applies only when {other} is one of {list(allowed)}; give {other} too")
        if not is_active(p, entry):
            raise _Invalid(f"{where}: applies only when {', '.join(f'{o} in {list(a)}' for o, a in p.when)}")
        out[name] = float(value) if p.type == "float" else value
    try:
        config.from_dict(apply_params(base, space, fill_params(space, out)))
    except config.ConfigError as err:
        raise _Invalid(f"enqueue[{i}]: makes an invalid config ({err})") from None
    return out


def _class_spec(doc: Mapping[str, Any], section: str, module: Any, base: type, default: str) -> ClassSpec:
    table = _table(doc, section, ("name", "kwargs"))
    name, kwargs = table.get("name", default), table.get("kwargs", {})
    valid = sorted(n for n, c in vars(module).items() if inspect.isclass(c) and issubclass(c, base)
                   and not inspect.isabstract(c) and not n.startswith(("_", "Base")))
    if name not in valid:
        raise _Invalid(f"{section}.name: unknown {section} {name!r} (valid: {', '.join(valid)})")
    if not isinstance(kwargs, Mapping):
        raise _Invalid(f"{section}.kwargs: expected a table, got {kwargs!r}")
    _check_plain(f"{section}.kwargs", kwargs)
    cls = getattr(module, name)
    accepted = inspect.signature(cls).parameters
    if not any(a.kind is a.VAR_KEYWORD for a in accepted.values()):
        for key in kwargs:
            if key not in accepted:
                raise _Invalid(f"{section}.kwargs.{key}: not an argument of {name} (valid: {', '.join(accepted)})")
    seed = kwargs.get("seed")  # NumPy's range; a worker adds its pid to it, modulo 2**32 (make_sampler)
    if "seed" in kwargs and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEEDS):
        raise _Invalid(f"{section}.kwargs.seed: expected an integer in [0, 2**32), got {seed!r}")
    try:
        inspect.signature(cls).bind(**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature warnings; the worker shows them
            cls(**kwargs)
    except Exception as err:  # noqa: BLE001 - any constructor complaint is a bad kwargs table
        raise _Invalid(f"{section}.kwargs: {name} rejects them ({first_line(err)})") from None
    return ClassSpec(name=name, kwargs=dict(kwargs))


class _NamedTrial:
    """An optuna.Trial that remembers which parameter it was last asked to suggest."""

    def __init__(self, trial: optuna.Trial):
        self.trial, self.suggesting = trial, None

    def __getattr__(self, attr: str) -> Any:
        method = getattr(self.trial, attr)
        if not attr.startswith("suggest_"):
            return method

        def suggest(name: str, *args: Any, **kwargs: Any) -> Any:
            self.suggesting = name
            return method(name, *args, **kwargs)

        return suggest


def _check_sampling(spec: StudySpec) -> None:
    """The sampler and pruner checked by use, not only by name: one trial on a throwaway
    in-memory study, as a worker runs it (ask, suggest the space, report, should_prune, tell),
    then every parameter its conditions left out, so that a sampler that cannot sample the
    space (a GridSampler whose search_space misses a parameter) is one line here instead of
    a failed trial, again and again, in every worker."""
    sampler = spec.sampler
    where = ("sampler.kwargs.search_space" if "search_space" in sampler.kwargs
             else "sampler.kwargs" if sampler.kwargs else "sampler.name")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "A new study created in memory", grid warnings
    step = f"{where}: {sampler.name} cannot start a trial"
    trial = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(directions=[o.direction for o in spec.objectives],
                                        sampler=make_sampler(spec), pruner=make_pruner(spec))
            trial = _NamedTrial(study.ask())
            step = "sampling"
            values = suggest_params(trial, spec)  # the worker's path: active parameters, parents first
            for p in spec.space:  # and those its conditions left out, each as if it were active
                if p.name not in values:
                    suggest_params(trial, (dataclasses.replace(p, when=()),))
            if not spec.multi:  # Optuna refuses report and should_prune in multi-objective studies
                step = f"pruner: {spec.pruner.name} fails on a trial's first report"
                trial.report(0.0, 0)
                trial.should_prune()
            step = f"{where}: {sampler.name} cannot finish a trial"
            if spec.limits:
                from .costs import record_constraints
                record_constraints(trial.trial, spec, [0.0] * len(spec.limits))
            study.tell(trial.trial, [0.0] * len(spec.objectives) if spec.multi else 0.0)
    except Exception as err:  # noqa: BLE001 - whatever the sampler or pruner raises is this spec's fault
        if step == "sampling":
            step = f"{where}: {sampler.name} cannot sample space.{trial.suggesting}"
        raise _Invalid(f"{step} ({first_line(err, with_type=True)})") from None
    finally:
        optuna.logging.set_verbosity(verbosity)
