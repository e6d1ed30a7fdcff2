"""The one training loop: search trials and final training both run through `train_epochs`.

The dataset lives on the training device as uint8 (airbench-style). A batch is an index slice of
that tensor, normalised and augmented on the device as a whole: no DataLoader, no PIL, no
per-sample Python in the hot loop. On CUDA each full batch's step is one replayed CUDA graph
(`GraphedSteps`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import models
from search import datasets
from search.augment import Normalizer, batch_crop, batch_erase, batch_flip
from search.config import RunConfig, from_dict, to_dict
from search.errors import CheckpointError, DeviceError, first_line

EpochHook = Callable[[int, dict], None]


@dataclass
class FitResult:
    history: list[dict]  # one dict per finished epoch
    best_val_acc: float
    best_epoch: int
    stop_reason: str  # "finished" | "diverged: <why>"
    model: nn.Module
    n_params: int
    device: str
    precision: str  # "bf16" (autocast) or "fp32"
    cuda_graph: bool = False  # training steps replayed as CUDA graphs
    test_acc: float | None = None
    test_loss: float | None = None
    extras: dict = field(default_factory=dict)
    state: TrainState | None = None  # the run as it ended: its state_dict() is a checkpoint


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device: {name} requested but no CUDA device is available")
    return device


def make_optimizer(cfg: RunConfig, params, capturable: bool = False) -> torch.optim.Optimizer:
    """capturable: Adam's update may be recorded in a CUDA graph (its step count on the device)."""
    # fused: one kernel for the whole update instead of one per tensor; at batch 32 the
    # optimizer step is a visible share of each step (CPU and CUDA alike, torch >= 2.4).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "rmsprop":  # has no fused implementation
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True, capturable=capturable)


def make_scheduler(cfg: RunConfig, opt, steps_per_epoch: int):
    """Returns (scheduler or None, steps per batch?) — StepLR steps per epoch, the others per batch."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.step_gamma), False
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total), True
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total), True
    return None, False


class FlipAveraged(nn.Module):
    """A model whose logits are the mean of its own on an image and on its mirror image (test-time
    flip): how a run with `tta_flip` is validated and tested, and how predict and model.onnx answer."""

    def __init__(self, model: nn.Module | Callable):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x).float() + self.model(x.flip(3)).float()) / 2


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normalizer,
             batch_size: int = 1024, bf16: bool = False, forward: Callable | None = None,
             tta_flip: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over uint8 images already on the model's device.

    `forward` computes the logits in the model's place (its compiled form, `TrainState.forward`).
    `tta_flip`: the logits are the mean of the image's and its mirror image's (test-time flip).
    """
    model.eval()
    forward = model if forward is None else forward
    if tta_flip:
        forward = FlipAveraged(forward)
    device = x.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, x.shape[0], batch_size):
        xb = _prepare(norm(x[i:i + batch_size]))
        with _autocast(device, bf16):
            logits = forward(xb)
        loss_sum += F.cross_entropy(logits.float(), y[i:i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum()
    n = max(1, x.shape[0])
    return loss_sum.item() / n, correct.item() / n


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes bf16 in hardware (CUDA since Ampere; AVX512-BF16 or AMX CPUs).

    Emulated bf16 is slower than fp32, so `precision = "auto"` only uses it where it is native.
    The CPU checks are private torch helpers; a torch without them gets fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def uses_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def _autocast(device: torch.device, bf16: bool, cache: bool = True):
    # cache=False inside CUDA graphs: the bf16 copies of the weights are made in the graph each step
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    # channels_last: oneDNN (CPU) and cuDNN both run these convs faster in NHWC
    # (measured: fp32 NCHW -> NHWC, 2,734 -> 3,628 samples/s on a 2-core AVX-512 CPU, batch 32).
    return x.contiguous(memory_format=torch.channels_last)


def chance_level(y: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(chance, margin): the accuracy of always predicting the most common class, and how far
    above it an untrained network can land by luck on this many validation images (3 sigma)."""
    if y.numel() == 0:
        return 1.0 / num_classes, 0.0
    chance = torch.bincount(y, minlength=num_classes).max().item() / y.numel()
    return chance, max(0.01, 3 * math.sqrt(chance * (1 - chance) / y.numel()))


def _steps(n: int, batch_size: int) -> tuple[int, int]:
    """(batch size, steps per epoch) for n training images."""
    bs = min(batch_size, n)
    return bs, n // bs + (1 if n % bs > 1 else 0)  # a lone last sample would break BatchNorm


def _capture_rng(device: torch.device) -> dict:
    # Dropout and the augmentation draw from the training device's global generator. Nothing
    # in the loop or the models uses Python's `random` or numpy: their states are no part of a run.
    return {"torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore_rng(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch_cpu"].cpu())  # .cpu(): a checkpoint may be loaded with map_location
    if device.type == "cuda" and rng["torch_cuda"] is not None:
        torch.cuda.set_rng_state(rng["torch_cuda"].cpu(), device)


# Where a run's files and device are, not what it computes: a run may continue with these changed.
# compile and cuda_graph too: how the same steps are launched, which the machine decides
# (where inductor cannot compile the run goes on eager; graphs exist on CUDA only).
PLACE_KEYS = ("device", "data_dir", "download", "compile", "cuda_graph")


class CompiledOrEager:
    """`torch.compile(model)`, or the model itself from the first call that fails to compile.

    The model stays the plain module (state_dict keys without `_orig_mod.`); the compiled form
    shares its parameters, so loading a checkpoint into the model updates both. A machine without
    a working C++ compiler gets one warning and trains eager instead of crashing.
    """

    def __init__(self, model: nn.Module):
        self.model, self.compiled = model, torch.compile(model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            # What inductor raises when it cannot build its kernels (torch 2.14, checked by pointing
            # its cxx at a missing compiler): InductorError, a BackendCompilerFailed, saying
            # InvalidCxxCompiler. Named here, not at import: torch._dynamo takes seconds to import.
            try:
                return self.compiled(x)
            except torch._dynamo.exc.BackendCompilerFailed as err:
                warnings.warn(f"compile: torch.compile failed, training eager instead ({first_line(err)})",
                              RuntimeWarning, stacklevel=2)
                self.compiled = None
        return self.model(x)


def graph_blocker(cfg: RunConfig, device: torch.device) -> str | None:
    """Why this run's training steps cannot replay as a CUDA graph; None when they can."""
    if device.type != "cuda":
        return f"device {device.type}: CUDA graphs exist on CUDA only"
    if not cfg.cuda_graph:
        return "cuda_graph = false"
    if cfg.compile:
        return "compile = true: inductor launches its own kernels"
    return None


def graph_updates(cfg: RunConfig) -> bool:
    """Whether the optimizer's update is part of the graph, or runs eager after each replay.

    Inside it takes a fused, capturable update whose only changing input is the learning rate
    (Adam, AdamW, SGD; none, StepLR or cosine). One-cycle rewrites Adam's beta1 or SGD's
    momentum each step, values a captured update would keep as they were at capture, and
    RMSprop has no fused update: their update runs eager, one launch after the graph's."""
    return cfg.optimizer != "rmsprop" and cfg.scheduler != "onecycle"


class GraphedSteps:
    """The full batches of an epoch, each step replayed as one captured CUDA graph.

    A step is hundreds of small kernels (gather, normalise, augment, forward, backward, fused
    optimizer update, running sums); at batch 32 on a GPU, launching them from Python costs more
    than running them (the H200's first check: 2.5-3.2 ms a step for a 225k-parameter net). The
    graph replays the recorded launches in one call. Its inputs are static device buffers: the
    epoch's order (`perm`) and a position in it that the graph itself advances, so the loop hands
    it nothing per step. The first `WARMUP` steps of every epoch, and a short last batch, run
    eager (the warm-up that capture needs: cuDNN's algorithm choice, the optimizer's state), the
    same in an uninterrupted and a resumed run. Dropout and augmentation draw from the CUDA
    generator, which advances on each replay, so `TrainState`'s RNG capture and restore hold.

    With the update in the graph (`graph_updates`), the learning rate is the one value that
    changes between steps: the captured update reads it from a device tensor (`lr`), which
    `replay` refreshes from the optimizer's float whenever a scheduler changed it; the
    optimizer's own `lr` stays a float for schedulers and checkpoints. Without it, the graph
    ends with the gradients in its own buffers, the parameters' `.grad` from capture on, which
    the eager update reads and the eager steps zero in place instead of dropping.
    """

    WARMUP = 3

    def __init__(self, step: Callable[[torch.Tensor, bool], None], opt: torch.optim.Optimizer,
                 n: int, bs: int, device: torch.device, updates: bool = True):
        self.step, self.opt, self.bs, self.updates = step, opt, bs, updates
        self.full = n // bs  # steps with a whole batch; a short last one runs eager
        self.perm = torch.zeros(n, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.rows = torch.arange(bs, device=device)
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.lr_value: float | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.device = device

    def begin_epoch(self, perm: torch.Tensor) -> None:
        self.perm.copy_(perm)
        self.pos.fill_(self.WARMUP * self.bs)

    def replays(self, step: int) -> bool:
        return self.WARMUP <= step < self.full

    def eager(self, idx: torch.Tensor) -> None:
        """A step outside the graph; before capture, on a side stream as capture asks."""
        with warnings.catch_warnings():  # "capturable=True ... running without graph capture"
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable")
            if self.graph is not None:
                # the graph's own update reads its buffers: drop ours; an eager update reads .grad
                self.opt.zero_grad(set_to_none=self.updates)
                self.step(idx, True)
                return
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                self.step(idx, True)
            torch.cuda.current_stream(self.device).wait_stream(side)

    def replay(self) -> None:
        group = self.opt.param_groups[0]
        if self.updates and group["lr"] != self.lr_value:
            self.lr_value = group["lr"]
            self.lr.fill_(self.lr_value)
        if self.graph is None:
            self._capture(group)
        self.graph.replay()
        if not self.updates:
            self.opt.step()

    def _capture(self, group: dict) -> None:
        # Gradients are None at capture, so the recorded backward writes them afresh on each
        # replay (rather than adding into the last step's).
        self.opt.zero_grad(set_to_none=True)
        lr_value = group["lr"]
        if self.updates:
            group["lr"] = self.lr  # the recorded update reads the tensor
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step(self.perm[self.pos + self.rows], self.updates)
                self.pos += self.bs
        except RuntimeError as err:  # e.g. a model whose forward asks the host (.item(), data-dependent shapes)
            raise DeviceError(f"cuda_graph: this run's training step could not be captured as a CUDA graph "
                              f"({first_line(err)}); train it with cuda_graph = false") from err
        finally:
            group["lr"] = lr_value
        self.graph = graph


@dataclass(eq=False)
class TrainState:
    """Everything a run needs to continue, updated in place by `train_epochs`.

    As in a Lightning or Ray Tune checkpoint, model, optimizer, scheduler, loop progress and RNG
    streams travel together. The run owns its global RNG streams (`rng`): the loop restores them
    before each epoch and captures them after it, so nothing a caller draws between epochs
    shifts training, and a resumed run draws exactly what an uninterrupted one does.
    """

    cfg: RunConfig
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or its compiled form (cfg.compile)
    per_batch: bool  # the scheduler steps after every batch (cosine, onecycle), else every epoch
    generator: torch.Generator  # the data order: a stream of its own, seeded with cfg.seed
    rng: dict  # the global torch streams as the last epoch left them
    full_train: bool = False  # trains on train + validation (final training)
    # No GradScaler: bf16 autocast keeps fp32's exponent range, so gradients need no loss
    # scaling (fp16's would). The slot keeps the checkpoint layout should fp16 come.
    scaler: None = None
    epoch: int = 0  # finished epochs, which is also the number of the next one
    best_val_acc: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)  # one metrics dict per finished epoch
    stop_reason: str | None = None  # None while the run can go on; "finished" | "diverged: <why>"
    graph_replays: int = 0  # steps this process replayed as a CUDA graph (not saved: how, not what)

    @classmethod
    def start(cls, cfg: RunConfig, ds, device=None, *, full_train: bool = False) -> TrainState:
        """A fresh run: seeded, model, optimizer and scheduler built, nothing trained yet.

        Args:
            cfg: the run's settings.
            ds: the dataset, already on `device` (`search.datasets.to_device`).
            device: where to train; `cfg.device` resolved when None.
            full_train: train on train + validation (final training).
        """
        device = resolve_device(cfg.device) if device is None else torch.device(device)
        if ds.train_x.device.type != device.type:
            raise ValueError(f"the dataset is on {ds.train_x.device}, not on the training device {device}")
        torch.manual_seed(cfg.seed)
        model = models.build_model(cfg, ds.in_shape, ds.num_classes).to(device)
        model = model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        n = ds.train_x.shape[0] + (ds.val_x.shape[0] if full_train else 0)
        opt = make_optimizer(cfg, model.parameters(),
                             capturable=graph_blocker(cfg, device) is None and graph_updates(cfg))
        sched, per_batch = make_scheduler(cfg, opt, _steps(n, cfg.batch_size)[1])
        forward = CompiledOrEager(model) if cfg.compile else model
        return cls(cfg, device, model, opt, sched, forward, per_batch,
                   torch.Generator().manual_seed(cfg.seed), _capture_rng(device), full_train)

    @classmethod
    def resume(cls, saved: dict, ds, device=None) -> TrainState:
        """A saved `state_dict()` rebuilt to continue, as a restarted process does."""
        cfg = from_dict(saved["cfg"])
        state = cls.start(cfg if device is None else cfg.replace(device=str(device)), ds,
                          full_train=saved["full_train"])
        state.load_state_dict(saved)
        return state

    def state_dict(self) -> dict:
        """Plain data and tensors only (loads with weights_only=True); live tensors: save it at once."""
        return {"format": 1, "cfg": to_dict(self.cfg), "full_train": self.full_train,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": None,
                "progress": {"epoch": self.epoch, "best_val_acc": self.best_val_acc,
                             "best_epoch": self.best_epoch, "history": self.history,
                             "stop_reason": self.stop_reason},
                "rng": {"data_order": self.generator.get_state(), **self.rng}}

    def load_state_dict(self, saved: dict, *, longer: bool = False) -> None:
        """Continue a saved run in this freshly started state; sets the global torch RNGs at once.

        Args:
            saved: a `state_dict()`.
            longer: this run may have more epochs than the saved one (a search trial's last state
                carried on by its final-stage finalist): where the schedule does not depend on
                the length (none, StepLR), the run ends as one trained this long from the start.

        Raises:
            CheckpointError: the saved run had other settings (`PLACE_KEYS` aside; `epochs` too
                unless `longer` and it had at most these), another data split, or a schedule
                whose steps depend on the run's length (cosine, one-cycle) with other epochs.
        """
        mine = to_dict(self.cfg)
        same = PLACE_KEYS + (("epochs",) if longer and saved["cfg"]["epochs"] <= mine["epochs"] else ())
        differ = [k for k in mine if k not in same and saved["cfg"].get(k) != mine[k]]
        differ += ["full_train"] if saved["full_train"] != self.full_train else []
        if longer and self.per_batch and saved["cfg"]["epochs"] != mine["epochs"]:
            differ.append(f"epochs (a {self.cfg.scheduler} schedule is defined on the run's length)")
        if differ:
            raise CheckpointError(f"the saved run is another run: {', '.join(differ)} differ")
        self.model.load_state_dict(saved["model"])
        # A saved group carries its `capturable`: a run saved eager may continue as CUDA graphs, and
        # one saved from graphs on the CPU; this process's choice (TrainState.start) stays.
        capturable = [g.get("capturable") for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved["optimizer"])
        for group, value in zip(self.optimizer.param_groups, capturable):
            if value is not None:
                group["capturable"] = value
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        p = saved["progress"]
        self.epoch, self.best_val_acc, self.best_epoch = p["epoch"], p["best_val_acc"], p["best_epoch"]
        self.history, self.stop_reason = [dict(h) for h in p["history"]], p["stop_reason"]
        if self.stop_reason == "finished" and self.epoch < self.cfg.epochs:
            self.stop_reason = None  # a longer run goes on where the saved one finished
        rng = saved["rng"]
        self.generator.set_state(rng["data_order"].cpu())
        # A run saved on the CPU has no CUDA stream: this one's, seeded by start(), stays.
        self.rng = {"torch_cpu": rng["torch_cpu"].cpu(), "torch_cuda": rng["torch_cuda"]
                    if rng["torch_cuda"] is not None else self.rng["torch_cuda"]}
        _restore_rng(self.rng, self.device)


def train_epochs(state: TrainState, ds) -> Iterator[dict]:
    """Train `state` (in place) on `ds`, its dataset on its device, one epoch per iteration.

    Yields each healthy epoch's metrics (also appended to `state.history`), so the caller can
    report, prune, save `state.state_dict()` or break, and continue later with a new call. Ends
    by itself after `cfg.epochs` epochs (`stop_reason` "finished", set before the last yield) or
    on divergence: a non-finite training loss, or validation accuracy still at chance after
    `cfg.warmup_epochs`; a diverged epoch is recorded in the history but not yielded.
    """
    cfg, device, model, opt, sched = state.cfg, state.device, state.model, state.optimizer, state.scheduler
    train_x, train_y = ds.train_x, ds.train_y
    if state.full_train and ds.val_x.shape[0]:
        train_x, train_y = torch.cat([train_x, ds.val_x]), torch.cat([train_y, ds.val_y])
    has_val = ds.val_x.shape[0] > 0 and not state.full_train  # full_train: the model has seen val
    n = train_x.shape[0]
    bs, steps = _steps(n, cfg.batch_size)
    norm = Normalizer(ds.mean, ds.std, device)
    bf16 = uses_bf16(cfg.precision, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    chance, margin = chance_level(ds.val_y, ds.num_classes) if has_val else (0.0, 0.0)
    # the epoch's running sums, added to on the device (no sync per step); static for a graph
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    graphed = graph_blocker(cfg, device) is None

    def train_step(idx: torch.Tensor, update: bool = True) -> None:
        """One batch (and the optimizer's update unless `update` is False): gradients must be
        None or zero; the same code runs eager and captured."""
        xb, yb = norm(train_x[idx]), train_y[idx]
        if cfg.crop_padding:
            xb = batch_crop(xb, cfg.crop_padding)
        if cfg.flip:
            xb = batch_flip(xb)
        if cfg.erasing:
            xb = batch_erase(xb, cfg.erasing)
        with _autocast(device, bf16, cache=not graphed):
            logits = state.forward(_prepare(xb))
            loss = criterion(logits.float(), yb)
        loss.backward()
        if update:
            opt.step()
        loss_sum.add_(loss.detach() * idx.numel())
        correct.add_((logits.argmax(1) == yb).sum())

    graph = GraphedSteps(train_step, opt, n, bs, device, graph_updates(cfg)) if graphed else None
    while state.stop_reason is None:
        epoch = state.epoch
        if epoch >= cfg.epochs:
            state.stop_reason = "finished"
            return
        _restore_rng(state.rng, device)
        threads = torch.get_num_threads()  # launched CPU workers change it between epochs (search/cores.py)
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=state.generator).to(device)
        loss_sum.zero_()
        correct.zero_()
        if graph is not None:
            graph.begin_epoch(perm)
        seen = 0
        for step in range(steps):
            if graph is not None and graph.replays(step):
                graph.replay()
                state.graph_replays += 1
                seen += bs
            else:
                idx = perm[step * bs:(step + 1) * bs]
                if graph is not None:
                    graph.eager(idx)
                else:
                    opt.zero_grad(set_to_none=True)
                    train_step(idx)
                seen += idx.numel()
            if state.per_batch:
                sched.step()
        if sched is not None and not state.per_batch:
            sched.step()
        train_loss = loss_sum.item() / seen
        train_seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / seen,
                   "lr": opt.param_groups[0]["lr"], "train_seconds": train_seconds,
                   "samples_per_s": seen / train_seconds}
        if device.type == "cpu" and torch.get_num_threads() == threads:  # not changed during the epoch
            metrics["threads"] = threads
        if has_val:
            metrics["val_loss"], metrics["val_acc"] = evaluate(model, ds.val_x, ds.val_y, norm, bf16=bf16,
                                                               forward=state.forward, tta_flip=cfg.tta_flip)
        metrics["seconds"] = time.perf_counter() - t0
        state.rng, state.epoch = _capture_rng(device), epoch + 1
        state.history.append(metrics)

        if not math.isfinite(train_loss):
            state.stop_reason = f"diverged: training loss became {train_loss} in epoch {epoch + 1}"  # shown: from 1
            return
        if has_val:
            if metrics["val_acc"] > state.best_val_acc:
                state.best_val_acc, state.best_epoch = metrics["val_acc"], epoch
            if epoch + 1 >= cfg.warmup_epochs and metrics["val_acc"] <= chance + margin:
                state.stop_reason = (f"diverged: validation accuracy {metrics['val_acc']:.1%} still at chance "
                                     f"level ({chance:.1%} + {margin:.1%} noise) after {epoch + 1} epochs")
                return
        if state.epoch >= cfg.epochs:
            state.stop_reason = "finished"
        yield metrics


def fit(cfg: RunConfig, on_epoch: EpochHook | None = None, *, dataset=None,
        evaluate_test: bool = False, full_train: bool = False, state: TrainState | None = None) -> FitResult:
    """Train one configuration; evaluate on the validation split after every epoch.

    Args:
        cfg: the run's settings.
        on_epoch: called as on_epoch(epoch, metrics) after each healthy epoch (epoch counts from 0);
            exceptions it raises (optuna.TrialPruned) propagate to the caller.
        dataset: a loaded `search.datasets.Dataset`; loaded (and cached) from `cfg` when None.
        evaluate_test: evaluate the test split once, after the last epoch (final training only).
        full_train: train on train + validation (final training); validation metrics are then
            not reported, since the model has seen those images.
        state: continue this run (`TrainState.start` or `resume`, e.g. from a checkpoint) for its
            remaining epochs instead of starting afresh; its cfg and full_train must be these.

    Returns:
        FitResult. A diverging run (non-finite loss, or validation accuracy at chance after
        `cfg.warmup_epochs`) stops early with `stop_reason` saying why; it does not raise.
    """
    device = resolve_device(cfg.device) if state is None else state.device
    ds = datasets.to_device(dataset if dataset is not None else datasets.dataset_for(cfg), device)
    if state is None:
        state = TrainState.start(cfg, ds, device, full_train=full_train)
    elif state.cfg != cfg or state.full_train != full_train:
        raise ValueError("fit: the state is another run's (its cfg or full_train differ from these)")
    for metrics in train_epochs(state, ds):
        if on_epoch is not None:
            on_epoch(metrics["epoch"], metrics)

    bf16 = uses_bf16(cfg.precision, device)
    result = FitResult(history=state.history, best_val_acc=max(state.best_val_acc, 0.0),
                       best_epoch=state.best_epoch, stop_reason=state.stop_reason, model=state.model,
                       n_params=models.count_parameters(state.model), device=str(device),
                       precision="bf16" if bf16 else "fp32", cuda_graph=state.graph_replays > 0, state=state)
    if evaluate_test:
        norm = Normalizer(ds.mean, ds.std, device)
        result.test_loss, result.test_acc = evaluate(state.model, ds.test_x, ds.test_y, norm, bf16=bf16,
                                                     forward=state.forward, tta_flip=cfg.tta_flip)
    return result
