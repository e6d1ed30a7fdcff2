"""The search space as data: parameters parsed from a study file, suggested on a trial, written into a RunConfig.

A parameter is a float, int or categorical distribution with a *target* (where its value goes
in the RunConfig: a field, `model_params.<key>` or `model_params.<key>[i]`) and an optional
`when` condition on other parameters. A conditional parameter is suggested only when its
condition holds, so it appears only in the params of the trials it applies to.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from . import config
from .errors import SpaceError

TYPES = ("float", "int", "categorical")
_KEYS = {"type", "low", "high", "log", "step", "choices", "when", "target"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TARGET = re.compile(r"(?P<field>\w+)(?:\.(?P<key>\w+)(?:\[(?P<index>\d+)\])?)?")


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter.

    `when` is a tuple of (parameter name, allowed values) pairs that must all hold; `target` is
    the resolved place in the RunConfig the value is written to.
    """

    name: str
    type: str
    target: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()


def same(a: Any, b: Any) -> bool:
    """Equality that keeps true apart from 1 (TOML and JSON values are compared, not Python truthiness)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def contains(param: Param, value: Any) -> bool:
    """Whether the parameter's distribution can produce `value`."""
    if param.type == "categorical":
        return any(same(value, c) for c in param.choices)
    if not _is_number(value) or (param.type == "int" and not isinstance(value, int)):
        return False
    if not param.low <= value <= param.high:
        return False
    return param.step is None or _on_grid(value - param.low, param.step)


def _on_grid(span: float | int, step: float | int) -> bool:
    """Whether `span` is a whole number of steps (exactly for ints, to rounding error for floats)."""
    if isinstance(span, int) and isinstance(step, int):
        return span % step == 0
    n = span / step
    return math.isfinite(n) and math.isclose(n, round(n), abs_tol=1e-9)


def target_of(name: str) -> str:
    """The default target: the RunConfig field of the same name, else `model_params.<name>`."""
    return name if name in config.FIELDS else f"model_params.{name}"


def split_target(target: str) -> tuple[str, str | None, int | None]:
    """`model_params.pool[1]` -> ("model_params", "pool", 1); `lr` -> ("lr", None, None)."""
    m = _TARGET.fullmatch(target)
    if not m:
        raise SpaceError(f"not a target: {target!r}")
    index = m["index"]
    return m["field"], m["key"], None if index is None else int(index)


def parse_param(name: str, table: Any, fixed: Mapping[str, Any]) -> Param:
    """Checks one `[space.<name>]` table. `fixed` is the study's [fixed] table (for list targets).

    Raises:
        SpaceError: naming `space.<name>.<key>` and what was expected.
    """
    where = f"space.{name}"

    def fail(key: str | None, what: str) -> SpaceError:
        return SpaceError(f"{where}.{key}: {what}" if key else f"{where}: {what}")

    if not _NAME.fullmatch(name):
        raise fail(None, "parameter names must be letters, digits and _ (not starting with a digit)")
    if not isinstance(table, Mapping):
        raise fail(None, f"expected a table with a type, got {table!r}")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (valid: {', '.join(sorted(_KEYS))})")
    kind = table.get("type")
    if kind not in TYPES:
        raise fail("type", f"expected one of {', '.join(TYPES)}, got {kind!r}")
    allowed = {"choices"} if kind == "categorical" else {"high", "log", "low", "step"}
    extra = sorted(set(table) - allowed - {"type", "when", "target"})
    if extra:
        raise fail(extra[0], f"not used by a {kind} parameter (it takes {', '.join(sorted(allowed))})")
    fields = _choices(table, fail) if kind == "categorical" else _range(kind, table, fail)
    when = table.get("when", {})
    if not isinstance(when, Mapping):
        raise fail("when", f"expected a table like {{ optimizer = [\"sgd\"] }}, got {when!r}")
    conds = []
    for other, values in when.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise fail(f"when.{other}", "expected at least one value")
        conds.append((other, tuple(values)))
    target = table.get("target", target_of(name))
    if not isinstance(target, str):
        raise fail("target", f"expected a string, got {target!r}")
    _check_target(target, fixed, lambda what: fail("target", what))
    return Param(name=name, type=kind, target=target, when=tuple(conds), **fields)


def _choices(table: Mapping[str, Any], fail) -> dict[str, Any]:
    choices = table.get("choices")
    if not isinstance(choices, list) or not choices:
        raise fail("choices", f"expected a non-empty list, got {choices!r}")
    for i, c in enumerate(choices):
        if not isinstance(c, (str, bool, int, float)) or (isinstance(c, float) and not math.isfinite(c)):
            raise fail("choices", f"values must be strings, finite numbers or booleans, got {c!r}")
        if c in choices[:i]:  # Optuna stores a choice as its index, found with ==, so 1 and true collide
            raise fail("choices", f"{c!r} is listed twice (or equals an earlier choice)")
    return {"choices": tuple(choices)}


def _range(kind: str, table: Mapping[str, Any], fail) -> dict[str, Any]:
    number, cast = (int, int) if kind == "int" else ((int, float), float)
    for key in ("low", "high"):
        v = table.get(key)
        if not isinstance(v, number) or isinstance(v, bool) or not math.isfinite(v):
            raise fail(key, f"expected {'an integer' if kind == 'int' else 'a finite number'}, got {v!r}")
    low, high, log, step = table["low"], table["high"], table.get("log", False), table.get("step")
    if not isinstance(log, bool):
        raise fail("log", f"expected true or false, got {log!r}")
    if low > high:
        raise fail("low", f"must be <= high ({high!r}), got {low!r}")
    if log and low <= 0:
        raise fail("low", f"must be > 0 when log = true, got {low!r}")
    if step is not None:
        if log:
            raise fail("step", "cannot be combined with log = true")
        if not isinstance(step, number) or isinstance(step, bool) or not 0 < step < math.inf:
            raise fail("step", f"expected a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
        if not _on_grid(high - low, step):
            raise fail("step", f"high - low must be a multiple of step {step}, got {high - low!r}")
        step = cast(step)
    return {"low": cast(low), "high": cast(high), "log": log, "step": step}


def _check_target(target: str, fixed: Mapping[str, Any], fail) -> None:
    m = _TARGET.fullmatch(target)
    if not m or m["field"] not in config.FIELDS:
        raise fail(f"{target!r} is not a RunConfig field or model_params.<key>[<index>] "
                   f"(fields: {', '.join(f for f in config.FIELDS if f not in config.DATA_FIELDS)})")
    field, key, index = split_target(target)
    if field in config.DATA_FIELDS:
        raise fail(f"{field!r} is a data field; the data is the same for every trial (set it in [data])")
    if key is None and config.FIELDS[field].type == "dict":
        raise fail(f"{field!r} is a table; target one key, like {field}.<key>")
    if key is not None and field != "model_params":
        raise fail(f"only model_params has keys to target, got {target!r}")
    if index is not None:
        current = (fixed.get("model_params") or {}).get(key)
        if not isinstance(current, list):
            raise fail(f"{target!r} indexes model_params.{key}, which [fixed] must define as a list, got {current!r}")
        if index >= len(current):
            raise fail(f"{target!r} is past the end of model_params.{key} in [fixed] ({len(current)} entries)")


def check_space(params: Sequence[Param]) -> tuple[Param, ...]:
    """Cross-parameter checks; returns the params in dependency order (each after those its `when` names).

    Two parameters may write the same target only when their conditions exclude each other
    (e.g. `lr_sgd` when optimizer is sgd, `lr_adam` when it is adam).

    Raises:
        SpaceError: a `when` naming a missing parameter or impossible values, a cycle, or two
            parameters that can write the same target in one trial.
    """
    by_name = {p.name: p for p in params}
    for p in params:
        for other, values in p.when:
            q = by_name.get(other)
            if q is None:
                raise SpaceError(f"space.{p.name}.when.{other}: no such parameter (parameters: {', '.join(by_name)})")
            if q.type == "float":
                raise SpaceError(f"space.{p.name}.when.{other}: conditions need a categorical or int parameter")
            for v in values:
                if not contains(q, v):
                    raise SpaceError(f"space.{p.name}.when.{other}: {other} can never be {v!r}")
    ordered: list[Param] = []
    done: set[str] = set()
    while len(ordered) < len(params):  # file order, except that a parameter waits for its parents
        ready = next((p for p in params if p.name not in done and all(o in done for o, _ in p.when)), None)
        if ready is None:
            stuck = [p.name for p in params if p.name not in done]
            raise SpaceError(f"space.{stuck[0]}.when: conditions form a cycle among {', '.join(stuck)}")
        ordered.append(ready)
        done.add(ready.name)
    needs = {p.name: _requirements(p, by_name) for p in params}
    for i, p in enumerate(params):
        for q in params[:i]:
            if _overlap(p.target, q.target) and not _exclusive(needs[p.name], needs[q.name]):
                raise SpaceError(f"space.{p.name}.target: {p.target!r} overlaps the target of {q.name}")
    return tuple(ordered)


def _overlap(a: str, b: str) -> bool:
    """Same target, or a whole list and one of its entries."""
    return a == b or a.startswith(b + "[") or b.startswith(a + "[")


def _exclusive(need_a: Mapping[str, list], need_b: Mapping[str, list]) -> bool:
    """Whether two sets of requirements ask some parameter for values that have nothing in common."""
    return any(not any(same(x, y) for x in need_a[n] for y in need_b[n]) for n in need_a.keys() & need_b.keys())


def is_active(param: Param, values: Mapping[str, Any]) -> bool:
    """Whether `param`'s condition holds for the values chosen so far."""
    return all(o in values and any(same(values[o], v) for v in allowed) for o, allowed in param.when)


def suggest_params(trial: Any, spec_or_space: Any) -> dict[str, Any]:
    """Suggests every active parameter on an Optuna trial, parents before the parameters they condition.

    Args:
        trial: an `optuna.Trial`.
        spec_or_space: a StudySpec (its `.space` is used) or a sequence of Param.

    Returns:
        {name: value} for the parameters whose condition held; the others are not suggested.
    """
    space = getattr(spec_or_space, "space", spec_or_space)
    values: dict[str, Any] = {}
    for p in check_space(space):
        if not is_active(p, values):
            continue
        if p.type == "categorical":
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.type == "int":
            values[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return values


def apply_params(base: Mapping[str, Any], space: Sequence[Param], params: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` (RunConfig values) with each parameter's value written to its target."""
    by_name = {p.name: p for p in space}
    out = copy.deepcopy(dict(base))
    for name, value in params.items():
        if name not in by_name:
            raise SpaceError(f"unknown parameter {name!r} (parameters: {', '.join(by_name)})")
        field, key, index = split_target(by_name[name].target)
        if key is None:
            out[field] = value
            continue
        table = out.setdefault(field, {})
        if index is None:
            table[key] = value
        else:
            table[key][index] = value  # the list is the deep copy's, never the spec's
    return out


def params_to_config(spec: Any, params: Mapping[str, Any]) -> config.RunConfig:
    """The RunConfig of one trial: the spec's [data] and [fixed], then each param at its target.

    Raises:
        SpaceError: a parameter the spec does not define.
        config.ConfigError: the resulting config is invalid (one line naming the key).
    """
    values = apply_params({**spec.data, **spec.fixed}, spec.space, params)
    return config.from_dict(values, source=f"study {spec.name}")


def representative(param: Param) -> Any:
    """The value a parameter takes while others are being checked: its first choice, or its low end."""
    return param.choices[0] if param.type == "categorical" else param.low


def fill_params(space: Sequence[Param], forced: Mapping[str, Any]) -> dict[str, Any]:
    """Values for every active parameter: `forced` where given, else the representative value."""
    return _fill(check_space(space), forced)


def _fill(ordered: Sequence[Param], forced: Mapping[str, Any]) -> dict[str, Any]:
    """fill_params on a space already in dependency order."""
    values: dict[str, Any] = {}
    for p in ordered:
        if is_active(p, values):
            values[p.name] = forced.get(p.name, representative(p))
    return values


def corner_values(param: Param) -> tuple:
    """The values corner_params tries for `param`: each choice, or both ends of the range."""
    return tuple(param.choices) if param.type == "categorical" else tuple(sorted({param.low, param.high}))


def corner_params(space: Sequence[Param]) -> Iterator[tuple[Param | None, Any, dict[str, Any]]]:
    """Params dicts that together try every choice and both ends of every range once.

    Yields (param, value, params): first (None, None, all representative), then for each
    parameter and value a dict where it has that value, its conditions hold (parents forced to
    allowed values) and every other active parameter is representative.

    Raises:
        SpaceError: a parameter whose conditions can never hold together.
    """
    by_name = {p.name: p for p in space}
    yield None, None, fill_params(space, {})
    for p in check_space(space):
        forced = {name: allowed[0] for name, allowed in _requirements(p, by_name).items()}
        for value in corner_values(p):
            yield p, value, fill_params(space, {**forced, p.name: value})


def corner_pairs(space: Sequence[Param], among: Sequence[Param] | None = None
                 ) -> Iterator[tuple[Param, Any, Param, Any, dict[str, Any]]]:
    """Params dicts where two parameters take a corner value each, every pair of them once.

    Yields (p, v, q, w, params) for each two parameters of `among` (default: all) and each of
    their corner values (`corner_values`) that can occur together: both active, with their
    conditions met (parents forced as in corner_params); every other active parameter is
    representative. Pairs whose conditions exclude each other are left out. What single
    corners cannot see: two values each fine alone but not together (nesterov = true where
    optimizer can be adam).
    """
    ordered = check_space(space)
    by_name = {p.name: p for p in space}
    chosen = ordered if among is None else [p for p in ordered if p in among]
    needs = {p.name: _requirements(p, by_name) for p in chosen}
    for i, p in enumerate(chosen):
        for q in chosen[i + 1:]:
            parents = {}  # a value each ancestor may take for both to be active
            for name in needs[p.name].keys() | needs[q.name].keys():
                a, b = needs[p.name].get(name), needs[q.name].get(name)
                both = a if b is None else b if a is None else [x for x in a if any(same(x, y) for y in b)]
                if not both:
                    break
                parents[name] = both[0]
            else:
                for v in corner_values(p):
                    for w in corner_values(q):
                        params = _fill(ordered, {**parents, p.name: v, q.name: w})
                        if (p.name in params and q.name in params and same(params[p.name], v)
                                and same(params[q.name], w)):
                            yield p, v, q, w, params


def _requirements(param: Param, by_name: Mapping[str, Param]) -> dict[str, list]:
    """The values every ancestor must take for `param` to be active (intersected along all paths)."""
    needed: dict[str, list] = {}
    stack = [param]
    while stack:
        p = stack.pop()
        for other, allowed in p.when:
            prev = needed.get(other)
            keep = [v for v in allowed if prev is None or any(same(v, w) for w in prev)]
            if not keep:
                raise SpaceError(f"space.{param.name}.when: the conditions on {other} can never hold together")
            needed[other] = keep
            stack.append(by_name[other])
    return needed
