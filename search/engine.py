"""The one training loop: search trials and final training both run through `fit`.

The dataset lives on the training device as uint8 (airbench-style). A batch is an index slice of
that tensor, normalised and augmented on the device as a whole: no DataLoader, no PIL, no
per-sample Python in the hot loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import models
from search import data as data_mod
from search.config import RunConfig

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
    test_acc: float | None = None
    test_loss: float | None = None
    extras: dict = field(default_factory=dict)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name} requested but no CUDA device is available")
    return device


class Normalizer:
    """uint8 [B,C,H,W] -> float, (x/255 - mean)/std in one fused multiply-add."""

    def __init__(self, mean, std, device: torch.device):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)


def batch_flip(x: torch.Tensor) -> torch.Tensor:
    """Flip half the images horizontally."""
    mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(mask, x.flip(3), x)


def batch_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by `padding`, then take a random HxW window per image (RandomCrop(padding=p))."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (dx + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chans, rows, cols]


def batch_erase(x: torch.Tensor, p: float, scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> torch.Tensor:
    """RandomErasing(p, scale, ratio, value=0) on a normalised batch, one rectangle per image."""
    b, _, h, w = x.shape
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(*scale) * (h * w)
    log_r = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    eh = torch.sqrt(area * torch.exp(log_r)).round().clamp(1, h)
    ew = torch.sqrt(area / torch.exp(log_r)).round().clamp(1, w)
    top = (torch.rand(b, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(b, device=dev) * (w - ew + 1)).floor()
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (ys >= top.view(b, 1, 1)) & (ys < (top + eh).view(b, 1, 1))
        & (xs >= left.view(b, 1, 1)) & (xs < (left + ew).view(b, 1, 1))
    )
    chosen = (torch.rand(b, device=dev) < p).view(b, 1, 1)
    return x.masked_fill((inside & chosen).unsqueeze(1), 0.0)


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    # fused: one kernel for the whole update instead of one per tensor; at batch 32 the
    # optimizer step is a visible share of each step (CPU and CUDA alike, torch >= 2.4).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "rmsprop":  # has no fused implementation
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normalizer,
             batch_size: int = 1024, bf16: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over uint8 images already on the model's device."""
    model.eval()
    device = x.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, x.shape[0], batch_size):
        xb = _prepare(norm(x[i:i + batch_size]))
        with _autocast(device, bf16):
            logits = model(xb)
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


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


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


def fit(cfg: RunConfig, on_epoch: EpochHook | None = None, *, dataset=None,
        evaluate_test: bool = False, full_train: bool = False) -> FitResult:
    """Train one configuration; evaluate on the validation split after every epoch.

    Args:
        cfg: the run's settings.
        on_epoch: called as on_epoch(epoch, metrics) after each healthy epoch (epoch counts from 0);
            exceptions it raises (optuna.TrialPruned) propagate to the caller.
        dataset: a loaded `search.data.Dataset`; loaded (and cached) from `cfg` when None.
        evaluate_test: evaluate the test split once, after the last epoch (final training only).
        full_train: train on train + validation (final training); validation metrics are then
            not reported, since the model has seen those images.

    Returns:
        FitResult. A diverging run (non-finite loss, or validation accuracy at chance after
        `cfg.warmup_epochs`) stops early with `stop_reason` saying why; it does not raise.
    """
    device = resolve_device(cfg.device)
    ds = data_mod.to_device(dataset if dataset is not None else data_mod.dataset_for(cfg), device)
    torch.manual_seed(cfg.seed)
    model = models.build_model(cfg, ds.in_shape, ds.num_classes).to(device)
    model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bf16 = uses_bf16(cfg.precision, device)
    n_params = models.count_parameters(model)

    train_x, train_y = ds.train_x, ds.train_y
    if full_train and ds.val_x.shape[0]:
        train_x, train_y = torch.cat([train_x, ds.val_x]), torch.cat([train_y, ds.val_y])
    has_val = ds.val_x.shape[0] > 0 and not full_train
    n = train_x.shape[0]
    bs = min(cfg.batch_size, n)
    steps = n // bs + (1 if n % bs > 1 else 0)  # a lone last sample would break BatchNorm
    norm = Normalizer(ds.mean, ds.std, device)
    opt = make_optimizer(cfg, model.parameters())
    sched, per_batch = make_scheduler(cfg, opt, steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(cfg.seed)
    chance, margin = chance_level(ds.val_y, ds.num_classes) if has_val else (0.0, 0.0)

    history: list[dict] = []
    best_acc, best_epoch, reason = -1.0, -1, "finished"
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for step in range(steps):
            idx = perm[step * bs:(step + 1) * bs]
            xb, yb = norm(train_x[idx]), train_y[idx]
            if cfg.crop_padding:
                xb = batch_crop(xb, cfg.crop_padding)
            if cfg.flip:
                xb = batch_flip(xb)
            if cfg.erasing:
                xb = batch_erase(xb, cfg.erasing)
            with _autocast(device, bf16):
                logits = model(_prepare(xb))
                loss = criterion(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_batch:
                sched.step()
            loss_sum += loss.detach() * idx.numel()
            correct += (logits.argmax(1) == yb).sum()
            seen += idx.numel()
        if sched is not None and not per_batch:
            sched.step()
        train_loss = loss_sum.item() / seen
        train_seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / seen,
                   "lr": opt.param_groups[0]["lr"], "train_seconds": train_seconds,
                   "samples_per_s": seen / train_seconds}
        if has_val:
            metrics["val_loss"], metrics["val_acc"] = evaluate(model, ds.val_x, ds.val_y, norm, bf16=bf16)
        metrics["seconds"] = time.perf_counter() - t0
        history.append(metrics)

        if not math.isfinite(train_loss):
            reason = f"diverged: training loss became {train_loss} in epoch {epoch}"
            break
        if has_val:
            if metrics["val_acc"] > best_acc:
                best_acc, best_epoch = metrics["val_acc"], epoch
            if epoch + 1 >= cfg.warmup_epochs and metrics["val_acc"] <= chance + margin:
                reason = (f"diverged: validation accuracy {metrics['val_acc']:.1%} still at chance level "
                          f"({chance:.1%} + {margin:.1%} noise) after {epoch + 1} epochs")
                break
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    result = FitResult(history=history, best_val_acc=max(best_acc, 0.0), best_epoch=best_epoch,
                       stop_reason=reason, model=model, n_params=n_params, device=str(device),
                       precision="bf16" if bf16 else "fp32")
    if evaluate_test:
        result.test_loss, result.test_acc = evaluate(model, ds.test_x, ds.test_y, norm, bf16=bf16)
    return result
