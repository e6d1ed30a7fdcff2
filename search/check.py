"""Models against the data, before any training: what `spec.load_spec` checks once a file parses.

The dataset's input shape and class count come from `search.datasets.describe` (no image is
loaded; a folder dataset is listed). Then every model the study is sure to meet is built on
PyTorch's meta device (shapes, no memory: a 3-billion-parameter model costs nothing) and one
training batch goes through it:

    [fixed]        must build and fit the input
    [[enqueue]]    each configuration must build, fit, and keep to the limits below
    the space      every corner (`space.corner_params`: each choice, both ends of each range,
                   the others at their first value) must have valid model params and keep to
                   the limits; one that cannot fit the input (`ModelShapeError`, e.g. four
                   max-pools on 8x8) is allowed, the search prunes such a trial as "rejected",
                   unless no point tried fits at all. Each parameter at the value that made
                   its corner largest, all at once, must keep to the limits too.
    pairs          two values of RunConfig fields that can meet in a trial must make a valid
                   config together (`space.corner_pairs`: nesterov = true where optimizer can
                   be adam would crash that trial)

The limits are the study's `max_params` (trainable parameters) and `max_memory` (the estimated
activation memory of one training batch, see `footprint`). Errors are SpecError lines naming
the key, `space.fc_width: 60000 makes a model of ...`; `load_spec` prefixes the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping

from . import config
from .errors import DataError, SpecError, first_line
from .space import apply_params, corner_pairs, corner_params, corner_values, fill_params, is_active, same, split_target

MAX_PARAMS = 50_000_000  # study.max_params default: trainable parameters of one model
MAX_MEMORY = 8 * 2**30  # study.max_memory default: estimated activation bytes of one training batch
FOOTPRINT_FIELDS = ("model", "model_params", "batch_size", "crop_padding")  # what a footprint depends on

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", re.IGNORECASE)
_BATCH_TOO_SMALL = "batchnorm needs more than one value per channel"  # the batch's fault, not the model's
_BUILDER_KEY = re.compile(r"^[^:]*: (?:unknown param '(?P<unknown>[^']*)'|(?P<key>\w+))")


@dataclass(frozen=True)
class Footprint:
    params: int  # trainable parameters
    activation_bytes: int  # estimated activation memory of one training batch (see `footprint`)
    batch_bytes: int = 0  # the part of it that is the input batch and its padded copy
    macs: int = 0  # multiply-accumulates per image in its Conv2d and Linear layers


@dataclass(frozen=True)
class Checked:
    """What `check_spec` found: the data's shape and the largest model it built."""

    in_shape: tuple[int, int, int]
    num_classes: int
    models: int  # distinct (model, params, batch) combinations built
    max_params: int
    max_activation_bytes: int


def parse_bytes(value: Any) -> int | None:
    """A positive byte count from an int or a string like "8GiB", "512 MiB", "2GB"; None if neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 1 else None
    if not isinstance(value, str) or not (m := _SIZE.fullmatch(value)) or m[2].lower() not in _UNITS:
        return None
    try:
        n = int(float(m[1]) * _UNITS[m[2].lower()])
    except OverflowError:  # "9999...9" beyond a float
        return None
    return n if n >= 1 else None


def format_bytes(n: int) -> str:
    """4294967296 -> '4 GiB', 1536 -> '1.5 KiB'."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"


def footprint(cfg: Any, in_shape: tuple[int, int, int], num_classes: int) -> Footprint:
    """`cfg`'s model built on the meta device, with one training batch of `cfg.batch_size` through it.

    The activation estimate: the output of every leaf module, 4 bytes an element (fp32), is
    kept for the backward pass, and backward needs a gradient of about the same size again:
    2 x sum(output numel) x 4 bytes, plus the normalised input batch (and its padded copy under
    crop_padding). bf16 autocast stores some of it at half size, so this errs high. Not counted:
    parameters, their gradients and optimizer state (held down by max_params), cuDNN workspaces
    and the CUDA context.

    Args:
        cfg: anything with model, model_params, batch_size and crop_padding (a RunConfig).

    Raises:
        ModelShapeError: an architecture that cannot fit `in_shape`.
        ModelConfigError: bad params, or a batch that does not go through the model (one line).
    """
    import torch
    from torch import nn

    import models

    try:
        with torch.device("meta"):
            model = models.build_model(cfg, in_shape, num_classes)
    except models.ModelConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a builder fed odd params (e.g. 2**63 channels) is still the params' fault
        raise models.ModelConfigError(f"{cfg.model}: cannot build it ({first_line(err)})") from None
    params = models.count_parameters(model)
    outputs, macs = [], []

    def record(module, inputs, output):
        outputs.extend(t.numel() for t in (output if isinstance(output, (tuple, list)) else (output,))
                       if isinstance(t, torch.Tensor))
        # each output element of a conv sums in_channels/groups x kernel products; of a linear, in_features
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs.append(output.numel() * (module.in_channels // module.groups) * kh * kw)
        elif isinstance(module, nn.Linear):
            macs.append(output.numel() * module.in_features)

    same_shape = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Identity,
                  nn.Dropout, nn.Dropout2d, nn.BatchNorm1d, nn.BatchNorm2d)
    for module in model.modules():
        if not any(True for _ in module.children()):  # leaves: containers would count their children twice
            module.register_forward_hook(record)
            # The common layers' output shapes are computed here, not by their meta kernels: those
            # are Python decompositions and shape checks that import torch._dynamo and sympy, 1-2 s
            # once per process. Any other layer (or an unusual setting) runs its meta kernel.
            if type(module) in same_shape:
                module.forward = _shape_only(module, cfg.model)
            elif type(module) is nn.Linear:
                module.forward = _linear_shape(module)
            elif type(module) in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
                module.forward = _adaptive_shape(module)
            elif type(module) is nn.Conv2d or (type(module) in (nn.MaxPool2d, nn.AvgPool2d) and not module.ceil_mode
                                               and module.padding in (0, (0, 0))
                                               and not getattr(module, "return_indices", False)):
                module.forward = _window_shape(module)
    batch = cfg.batch_size
    model.train()
    try:
        model(torch.empty(batch, *in_shape, device="meta"))
    except models.ModelConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a layer that rejects the shape: the model does not fit the data
        raise models.ModelConfigError(f"{cfg.model}: a batch of {batch}x{'x'.join(map(str, in_shape))} does not go "
                                      f"through it ({first_line(err)})") from None
    pixels = batch * in_shape[0] * in_shape[1] * in_shape[2]
    pad = getattr(cfg, "crop_padding", 0) or 0
    padded = batch * in_shape[0] * (in_shape[1] + 2 * pad) * (in_shape[2] + 2 * pad) if pad else 0
    return Footprint(params, 4 * (2 * sum(outputs) + pixels + padded), 4 * (pixels + padded), sum(macs) // batch)


def _linear_shape(module: Any):
    import torch

    def forward(x):
        if x.shape[-1] != module.in_features:  # what F.linear says, in its words
            raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({x.shape[0]}x{x.shape[-1]} and "
                               f"{module.in_features}x{module.out_features})")
        return torch.empty(*x.shape[:-1], module.out_features, device="meta")

    return forward


def _window_shape(module: Any):
    """Conv2d, and MaxPool2d/AvgPool2d without padding or ceil_mode: each side becomes
    (side + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1, as torch computes it."""
    import torch
    from torch import nn

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    conv = isinstance(module, nn.Conv2d)
    kernel = pair(module.kernel_size)
    stride = pair(module.stride if module.stride is not None else module.kernel_size)
    dilation = pair(getattr(module, "dilation", 1))
    padding = module.padding

    def forward(x):
        if conv and x.shape[1] != module.in_channels:  # what F.conv2d says, in its words
            raise RuntimeError(f"expected input{list(x.shape)} to have {module.in_channels} channels, but got "
                               f"{x.shape[1]} channels instead")
        if padding == "same":
            out = tuple(x.shape[-2:])
        else:
            pad = (0, 0) if padding == "valid" else pair(padding)
            out = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                        for n, p, d, k, s in zip(x.shape[-2:], pad, dilation, kernel, stride))
        if min(out) < 1:
            raise RuntimeError(f"Given input size {tuple(x.shape[1:])}, the calculated output size "
                               f"{'x'.join(map(str, out))} is too small")
        return torch.empty(x.shape[0], module.out_channels if conv else x.shape[1], *out, device="meta")

    return forward


def _adaptive_shape(module: Any):
    import torch

    size = module.output_size if isinstance(module.output_size, (tuple, list)) else (module.output_size,) * 2

    def forward(x):
        return torch.empty(*x.shape[:-2], *(s if s is not None else d for s, d in zip(size, x.shape[-2:])),
                           device="meta")

    return forward


def _shape_only(module: Any, model_name: str):
    from torch import nn

    import models

    def forward(x):
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.training and x.numel() // max(1, x.shape[1]) <= 1:
            # what F.batch_norm raises in training (ValueError, a crashed trial); here it is the config's
            raise models.ModelConfigError(
                f"{model_name}: {_BATCH_TOO_SMALL} in a training batch, got a batch of {x.shape[0]}"
                + (f" with {x.shape[2]}x{x.shape[3]} feature maps" if x.dim() == 4 else "")
                + "; use a larger batch_size")
        return x

    return forward


def check_spec(spec: Any) -> Checked:
    """Builds the models of a parsed StudySpec against its data (see the module docstring).

    Raises:
        SpecError: `<key>: <what>`, naming the [data], [fixed], [space] or [[enqueue]] key at fault.
    """
    import models

    in_shape, num_classes = _describe(spec.data)
    base = {**spec.data, **spec.fixed}
    found: dict[tuple, Footprint | Exception] = {}

    def measure(cfg: Any) -> Footprint:
        key = _footprint_key(cfg)
        if key not in found:
            try:
                found[key] = footprint(cfg, in_shape, num_classes)
            except models.ModelConfigError as err:
                found[key] = err
        if isinstance(found[key], Exception):
            raise found[key]
        return found[key]

    _check_fixed(spec, base, measure)
    _check_pairs(spec, base)

    fits, first_reject, at_corner = 0, None, {}
    for param, value, params in corner_params(spec.space):
        cfg = config.from_dict(apply_params(base, spec.space, params))  # valid: spec checked every corner
        try:
            size = measure(cfg)
        except models.ModelShapeError as err:
            first_reject = first_reject or str(err)
            continue  # a property of the space: pruned as "rejected" at trial time
        except models.ModelConfigError as err:
            raise SpecError(_blame_model(str(err), spec, params, param)) from None
        fits += 1
        if param is not None:
            at_corner[param.name, json.dumps(value)] = size
        over = _over(size, cfg, spec)
        if over:
            raise SpecError(f"{_who(spec, params, param, cfg, size)} {over}")
    _check_largest(spec, base, at_corner, measure)

    for i, entry in enumerate(spec.enqueue):
        cfg = config.from_dict(apply_params(base, spec.space, fill_params(spec.space, entry)))
        try:
            size = measure(cfg)
        except models.ModelConfigError as err:
            raise SpecError(f"enqueue[{i}]: {first_line(err)}") from None
        over = _over(size, cfg, spec)
        if over:
            raise SpecError(f"enqueue[{i}]: this configuration {over}")
    if not fits and not spec.enqueue:
        raise SpecError(f"space: no configuration tried (every choice and both ends of every range) fits the "
                        f"{in_shape[1]}x{in_shape[2]} input, so every trial would be rejected: {first_reject}")

    sizes = [f for f in found.values() if isinstance(f, Footprint)]
    return Checked(in_shape, num_classes, len(found), max((f.params for f in sizes), default=0),
                   max((f.activation_bytes for f in sizes), default=0))


def _describe(data: Mapping[str, Any]) -> tuple[tuple[int, int, int], int]:
    from . import datasets

    name = data.get("dataset", config.RunConfig.dataset)
    options = data.get("data_options") or {}
    try:
        return datasets.describe(name, options, data.get("data_dir"))
    except DataError as err:
        message = first_line(err)
        if message.startswith("options"):  # "options.n: ..." / "options: unknown key ..."
            raise SpecError(f"data.data_{message}") from None
        where = "data.data_options.path" if "path" in options else "data.data_options"
        raise SpecError(f"{where}: {message}") from None


def _check_fixed(spec: Any, base: Mapping[str, Any], measure) -> None:
    """[fixed]'s own model must build and fit; only its size counts here (the batch may be searched)."""
    import models

    model = base.get("model", config.RunConfig.model)
    model_params = base.get("model_params", {})
    cfg = SimpleNamespace(model=model, model_params=model_params, batch_size=2, crop_padding=0)
    try:
        size = measure(cfg)
    except models.ModelConfigError as err:
        message = first_line(err)
        m = _BUILDER_KEY.match(message)
        key = m and (m["unknown"] or m["key"])
        where = (f"fixed.model_params.{key}" if key and key in model_params
                 else "fixed.model_params" if model_params else "fixed.model")
        raise SpecError(f"{where}: {message}") from None
    if size.params > spec.max_params:
        where = "fixed.model_params" if model_params else "fixed.model"
        raise SpecError(f"{where}: {model} with these params makes a model of {size.params:,} parameters, "
                        f"over study.max_params = {spec.max_params:,}")


def _check_pairs(spec: Any, base: Mapping[str, Any]) -> None:
    """Every two values of RunConfig fields that can meet in a trial make a valid config (the spec
    checked each alone): nesterov = true where optimizer can be adam would crash that trial."""
    fields = [p for p in spec.space if split_target(p.target)[0] not in ("model", "model_params")]
    for p, v, q, w, params in corner_pairs(spec.space, fields):
        try:
            config.from_dict(apply_params(base, spec.space, params))
        except config.ConfigError as err:
            raise SpecError(f"space.{q.name}: {w!r} with {p.name} = {v!r} makes an invalid config ({err}); "
                            f"a when condition can keep them apart") from None


def _check_largest(spec: Any, base: Mapping[str, Any], at_corner: Mapping[tuple, Footprint], measure) -> None:
    """The corners vary one parameter at a time; a trial may take the largest value of each at once.

    For parameters, then for memory: each parameter that shapes the model or the batch at the
    corner value that made it largest, together, held to the limits.
    """
    import models

    shapers = [p for p in spec.space if split_target(p.target)[0] in FOOTPRINT_FIELDS]
    for attr in ("params", "activation_bytes"):
        forced = {}
        for p in shapers:
            sized = [(getattr(at_corner[p.name, json.dumps(v)], attr), i, v) for i, v in enumerate(corner_values(p))
                     if (p.name, json.dumps(v)) in at_corner]
            if sized:
                forced[p.name] = max(sized)[2]
        params = fill_params(spec.space, forced)
        together = [n for n in forced if n in params and same(params[n], forced[n])]
        if len(together) < 2:
            continue  # one parameter at its largest: its corner said so already
        try:
            cfg = config.from_dict(apply_params(base, spec.space, params))
            size = measure(cfg)
        except (config.ConfigError, models.ModelConfigError):
            continue  # not a configuration a trial can train (pruned as rejected, or not drawn)
        over = _over(size, cfg, spec, plural=True)
        if over:
            values = ", ".join(f"{n} = {params[n]!r}" for n in together)
            raise SpecError(f"space: the largest values together ({values}) {over}")


def _footprint_key(cfg: Any) -> tuple:
    return (cfg.model, json.dumps(cfg.model_params, sort_keys=True, default=repr), cfg.batch_size,
            getattr(cfg, "crop_padding", 0))


def _over(size: Footprint, cfg: Any, spec: Any, plural: bool = False) -> str | None:
    """What is over a limit, as the rest of a sentence whose subject is a value (or values)."""
    if size.params > spec.max_params:
        return (f"{'make' if plural else 'makes'} a model of {size.params:,} parameters, over study.max_params = "
                f"{spec.max_params:,}")
    if size.activation_bytes > spec.max_memory:
        return (f"{'need' if plural else 'needs'} about {format_bytes(size.activation_bytes)} of activations for a "
                f"training batch of {cfg.batch_size} (an estimate), over study.max_memory = "
                f"{format_bytes(spec.max_memory)}")
    return None


def _who(spec: Any, params: Mapping[str, Any], corner: Any, cfg: Any, size: Footprint) -> str:
    """`space.<name>: <value>` for a corner; for the first point, the parameters that shape its model."""
    if corner is not None:
        return f"space.{corner.name}: {params[corner.name]!r}"
    shapers = [p.name for p in spec.space if p.name in params and split_target(p.target)[0] in FOOTPRINT_FIELDS]
    if not shapers:  # nothing searched shapes the model, and [fixed]'s passed max_params: its batch is too big
        if cfg.crop_padding and 2 * size.batch_bytes > size.activation_bytes:
            return f"fixed.crop_padding: {cfg.crop_padding}"
        return f"fixed.batch_size: {cfg.batch_size} with this model"
    values = ", ".join(f"{n} = {params[n]!r}" for n in shapers)
    return f"space: every parameter at its first value ({values})"


def _blame_model(message: str, spec: Any, params: Mapping[str, Any], corner: Any) -> str:
    """The key a builder's complaint belongs to: the parameter writing the key it names, else the
    corner's parameter, else any parameter that writes model params."""
    message = message.strip().splitlines()[0]
    m = _BUILDER_KEY.match(message)
    key = m and (m["unknown"] or m["key"])
    if _BATCH_TOO_SMALL in message:
        batch = [p for p in spec.space if p.name in params and p.target == "batch_size"]
        if not batch:
            return f"fixed.batch_size: {message}"
        return f"space.{batch[0].name}: {params[batch[0].name]!r} makes an invalid model ({message})"
    writers = [p for p in spec.space if p.name in params and split_target(p.target)[0] in ("model", "model_params")]
    named = [p for p in writers if split_target(p.target)[1] == key]
    culprit = (corner if corner in named else named[0] if named else corner if corner in writers
               else writers[0] if writers else None)
    if culprit is None:
        return f"fixed.model_params: {message}"
    return f"space.{culprit.name}: {params[culprit.name]!r} makes an invalid model ({message})"


def data_here(data: Mapping[str, Any]) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """What `study.create` learns about the data on this machine before it writes anything.

    Returns:
        (class names, warnings): the class names of a folder dataset (they are stored with the
        study), else None; one line per warning, e.g. mnist's files are not in the data directory
        here (workers on other machines may have them, so the study is created all the same).

    Raises:
        DataError: a folder dataset whose folder cannot be listed (the message names the path).
    """
    from . import datasets

    name = data.get("dataset", config.RunConfig.dataset)
    options = data.get("data_options") or {}
    if name == "folder":
        if "path" not in options:
            raise DataError("data.data_options.path: the folder dataset needs the image folder's path")
        path = datasets.resolve_folder_path(options["path"], data.get("data_dir"))
        listing = datasets.list_folder(path, test_fraction=options.get("test_fraction", 0.1),
                                       split_seed=options.get("split_seed", 0))
        return tuple(listing.classes), ()
    missing = None if data.get("download") else datasets.missing_files(name, options, data.get("data_dir"))
    if missing is None:
        return None, ()
    return None, (f"{missing}; created all the same, for workers on machines that have it (here: "
                  "--data-dir DIR or CNNSEARCH_DATA=DIR; or --set data.download=true to let torchvision "
                  "fetch it)",)


def budget_warnings(spec: Any) -> tuple[str, ...]:
    """One line per way the study's budget leaves its sampler or pruner nothing to do: random
    start-up trials that take the whole budget, a pruner that waits past the last epoch or for
    more finished trials than the budget holds. Legal, so `create` warns rather than refuses."""
    import inspect

    import optuna

    def setting(section: str, cls: type, key: str, kwargs: Mapping[str, Any]):
        if key in kwargs:
            return kwargs[key]
        parameter = inspect.signature(cls).parameters.get(key)
        return None if parameter is None or parameter.default is parameter.empty else parameter.default

    epochs_param = next((p for p in spec.space if p.target == "epochs"), None)
    epochs = (epochs_param.high if epochs_param is not None and epochs_param.type != "categorical"
              else max(epochs_param.choices) if epochs_param is not None
              else spec.fixed.get("epochs", config.RunConfig.epochs))
    found = []
    sampler = getattr(optuna.samplers, spec.sampler.name)
    startup = setting("sampler", sampler, "n_startup_trials", spec.sampler.kwargs)
    if isinstance(startup, int) and startup >= spec.n_trials:
        found.append(f"sampler.kwargs.n_startup_trials: {startup} random start-up trials take the whole budget "
                     f"of {spec.n_trials} (study.n_trials), so {spec.sampler.name} never uses what it learns; "
                     "lower n_startup_trials or raise n_trials")
    pruner = getattr(optuna.pruners, spec.pruner.name)
    warmup = setting("pruner", pruner, "n_warmup_steps", spec.pruner.kwargs)
    if isinstance(warmup, int) and warmup >= epochs - 1:
        found.append(f"pruner.kwargs.n_warmup_steps: {warmup} steps of warm-up with at most {epochs} epochs "
                     f"(steps 0..{epochs - 1}): {spec.pruner.name} could prune only after the last epoch, "
                     "which saves nothing; lower n_warmup_steps or raise epochs")
    waiting = setting("pruner", pruner, "n_startup_trials", spec.pruner.kwargs)
    if isinstance(waiting, int) and waiting >= spec.n_trials:
        found.append(f"pruner.kwargs.n_startup_trials: {spec.pruner.name} waits for {waiting} finished trials "
                     f"before it prunes, and the budget is {spec.n_trials}: it will never prune; lower it "
                     "or raise n_trials")
    least = setting("pruner", pruner, "min_resource", spec.pruner.kwargs)
    if isinstance(least, int) and least >= epochs:
        found.append(f"pruner.kwargs.min_resource: {least} epochs before the first rung, with at most {epochs} "
                     f"epochs: {spec.pruner.name} will never prune; lower min_resource or raise epochs")
    return tuple(found) + _step_warnings(spec, epochs)


def _step_warnings(spec: Any, epochs: int) -> tuple[str, ...]:
    """StepLR whose first step comes after the trial's last epoch: the trial trains at a constant
    lr, the search ranks it so, and a final stage that stretches the schedule keeps it constant.
    A range written for longer trials (a study's 40 epochs cut to 8 for a CPU, say) does this to
    most of the trials that draw StepLR."""
    found = []
    for p in spec.space:
        if p.target != "step_size" or p.type == "float":
            continue
        if p.type == "categorical":
            never = [c for c in p.choices if isinstance(c, int) and not isinstance(c, bool) and c >= epochs]
            span = ", ".join(map(str, never))
        else:  # the first value on the range's grid from `epochs` on
            step = p.step or 1
            first = max(p.low, p.low + -(-(epochs - p.low) // step) * step)
            never = [first] if first <= p.high else []
            span = f"{first} to {p.high}" if first < p.high else f"{first}"
        if never:
            found.append(f"space.{p.name}: step_size {span} never steps in a trial of at most {epochs} epochs: "
                         f"StepLR at a constant lr, ranked and kept so; keep the range below {epochs} "
                         "(a step every few epochs)")
    fixed = spec.fixed.get("step_size")
    stepped = spec.fixed.get("scheduler") == "step" or any(
        p.target == "scheduler" and p.type == "categorical" and "step" in p.choices for p in spec.space)
    if (isinstance(fixed, int) and fixed >= epochs and stepped
            and not any(p.target == "step_size" for p in spec.space)):
        found.append(f"fixed.step_size: {fixed} never steps in a trial of at most {epochs} epochs: StepLR at "
                     f"a constant lr; keep it below {epochs}")
    for i, start in enumerate(spec.enqueue):
        size = next((v for k, v in start.items() for p in spec.space if p.name == k and p.target == "step_size"), None)
        if isinstance(size, int) and size >= epochs and start.get("scheduler", spec.fixed.get("scheduler")) == "step":
            found.append(f"enqueue[{i}]: step_size {size} never steps in a trial of at most {epochs} epochs: "
                         "the start trains at a constant lr")
    return tuple(found)


def start_warnings(spec: Any) -> tuple[str, ...]:
    """One line per [[enqueue]] start that leaves a parameter to the sampler: legal (Optuna fills
    it), but then the start is not the configuration the user wrote down, and a start that is a
    finalist whatever its rank (`final.baseline`) is drawn anew by each run of the study."""
    found = []
    for i, start in enumerate(spec.enqueue):
        left = [p.name for p in spec.space if p.name not in start and is_active(p, start)]
        if left:
            found.append(f"enqueue[{i}]: leaves {', '.join(left)} to the sampler, so the start is drawn anew "
                         "by each run of the study; give every parameter to make it the same")
    return tuple(found)
