"""cifar10: torchvision's python-pickle CIFAR-10 under the data directory, as NCHW uint8."""

from __future__ import annotations

import torch

from ._common import _torchvision, not_found
from ._registry import register_dataset

# The std over all training pixels; the often-copied 0.2023/0.1994/0.2010 is something else.
_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def _missing(options, root):
    """The first absent file of the python-pickle CIFAR-10, as a path under `root`, or None."""
    return next((f"cifar-10-batches-py/{f}" for f in _FILES if not (root / "cifar-10-batches-py" / f).is_file()), None)


@register_dataset("cifar10", shape=lambda options: (3, 32, 32), classes=lambda options, root: 10,
                  uses_data_dir=True, stats=_STATS, missing=_missing)
def _load_cifar10(root, download, options):
    missing = next((f for f in _FILES if not (root / "cifar-10-batches-py" / f).is_file()), None)
    if missing is not None and not download:
        raise not_found("cifar10", root, f"cifar-10-batches-py/{missing}")
    import torchvision  # slow to import; only cifar10 and downloads need it

    parts = _torchvision("cifar10", torchvision.datasets.CIFAR10, root, download=missing is not None)
    xs = [torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous() for p in parts]  # NHWC -> NCHW
    ys = [torch.tensor(p.targets, dtype=torch.long) for p in parts]
    return xs[0], ys[0], xs[1], ys[1], tuple(parts[0].classes)
