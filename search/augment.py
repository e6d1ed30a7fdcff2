"""Batches as the engine sees them: uint8 images normalised and augmented on the device.

Each function takes a whole batch [B, C, H, W] already on the training device and draws its
randomness from the device's global torch generator (which `TrainState` saves and restores),
so augmentation costs a handful of tensor ops per batch and resumes bitwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
