"""digits: scikit-learn's 1,797 8x8 handwritten digits, shipped with it (no download, no data_dir)."""

from __future__ import annotations

import numpy as np
import torch

from ._common import split_val
from ._registry import register_dataset

_TEST_FRACTION, _TEST_SEED = 0.2, 0  # digits ships no test split: carve a fixed one


@register_dataset("digits", shape=lambda options: (1, 8, 8), classes=lambda options, root: 10)
def _load_digits(root, download, options):
    from sklearn.datasets import load_digits  # sklearn is slow to import; only digits needs it

    bunch = load_digits()
    x = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)  # 0..16 -> 0..255
    y = torch.from_numpy(bunch.target).long()
    train_x, train_y, test_x, test_y = split_val(x, y, _TEST_FRACTION, _TEST_SEED)
    return train_x, train_y, test_x, test_y, tuple(str(i) for i in range(10))
