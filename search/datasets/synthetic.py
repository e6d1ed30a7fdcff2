"""synthetic: generated class prototypes, any shape and class count, for fast tests and benchmarks."""

from __future__ import annotations

import torch

from search.errors import DataError

from ._registry import register_dataset

_DEFAULTS = {"n": 1000, "classes": 10, "channels": 1, "size": 16, "seed": 0}


def _check(opts: dict) -> dict:
    for key, low in (("n", 1), ("classes", 2), ("channels", 1), ("size", 2), ("seed", 0)):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"options.{key}: expected an integer >= {low}, got {value!r}")
    if opts["n"] < opts["classes"]:
        raise DataError(f"options.n: need at least one image per class ({opts['classes']}), got {opts['n']}")
    return opts


@register_dataset("synthetic", options=_DEFAULTS, check=_check,
                  shape=lambda o: (o["channels"], o["size"], o["size"]), classes=lambda o, root: o["classes"])
def _load_synthetic(root, download, options):
    return _make_synthetic(**options)


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
