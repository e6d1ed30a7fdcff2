"""First load (decode + cache write) vs cached load of an image zip, side by side in one process.

What a search pays once per folder, then per trial and per worker process. Uses a fresh
temporary cache directory, so the first load always decodes.

    .venv/bin/python scripts/bench_folder.py [ZIP] [--size 32] [--channels 3] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from search.datasets import load_folder  # noqa: E402

CIFAR_ZIP = REPO / "../shared/datasets/cifar10-jpeg/cifar10-jpeg.zip"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decoding pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=CIFAR_ZIP, help="image zip or folder")
    parser.add_argument("--size", type=int, default=32, help="image_size (default 32)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    args = parser.parse_args()
    label = "CIFAR-10 (JPEG q75 copy)" if args.path.resolve() == CIFAR_ZIP.resolve() else args.path.name
    kw = dict(image_size=args.size, channels=args.channels, workers=args.workers)

    with tempfile.TemporaryDirectory(prefix="bench_folder_") as cache:
        start, cpu = time.perf_counter(), cpu_seconds()
        first = load_folder(args.path, cache_dir=cache, **kw)
        first_s, first_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        start = time.perf_counter()
        cached = load_folder(args.path, cache_dir=cache, **kw)
        cached_s = time.perf_counter() - start
        cache_mb = sum(f.stat().st_size for f in Path(cache).iterdir()) / 2**20

    n = len(first.train_x) + len(first.test_x)
    assert len(cached.train_x) + len(cached.test_x) == n
    print(f"{label}: {n} images ({len(first.train_x)} train + {len(first.test_x)} test, "
          f"{len(first.classes)} classes, {first.skipped} skipped) -> uint8 "
          f"{tuple(first.train_x.shape[1:])}; workers={args.workers or os.cpu_count()}, "
          f"cores={os.cpu_count()}, cache file {cache_mb:.0f} MiB")
    print(f"  first load (decode + cache write): {first_s:8.2f} s  {n / first_s:10,.0f} images/s"
          f"  ({first_cpu:.1f} CPU s; wall time depends on what else runs on the cores)")
    print(f"  cached load:                       {cached_s:8.2f} s  {n / cached_s:10,.0f} images/s")
    print(f"  ratio: cached load is {first_s / cached_s:,.0f}x faster")


if __name__ == "__main__":
    main()
