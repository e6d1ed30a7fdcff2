"""Seed-notebook training loop vs `search.engine.fit`, side by side in one process.

(a) the seeds' way: torchvision.datasets.MNIST (PIL images) + ToTensor + Normalize in a
    DataLoader(batch_size=32, shuffle=True), a plain PyTorch loop;
(b) `fit`: the same network, optimizer (Adam 1e-3), batch size, epochs and training images,
    with the dataset held on the device as uint8.
Both train on all 60,000 MNIST training images and are scored on the 10,000 test images.

    python scripts/bench_engine.py --data-dir ../shared/datasets/mnist --epochs 1
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms

import models
from search import datasets, engine
from search.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def seed_loop(cfg: RunConfig, raw_dir: Path, device: torch.device) -> tuple[float, float]:
    """Train the way the seed notebooks do; returns (train samples/s, test accuracy)."""
    with tempfile.TemporaryDirectory() as tmp:
        # torchvision's MNIST reads the uncompressed idx files; unpack a copy, never the shared data.
        (Path(tmp) / "MNIST" / "raw").mkdir(parents=True)
        for gz in raw_dir.glob("*-ubyte.gz"):
            with gzip.open(gz) as src, open(Path(tmp) / "MNIST" / "raw" / gz.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        train_set = torchvision.datasets.MNIST(tmp, train=True, download=False, transform=tf)
        test_set = torchvision.datasets.MNIST(tmp, train=False, download=False, transform=tf)
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True)
        torch.manual_seed(cfg.seed)
        model = models.build_model(cfg, (1, 28, 28), 10).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        loss_fn = nn.CrossEntropyLoss()
        seen, t0 = 0, time.perf_counter()
        for _ in range(cfg.epochs):
            model.train()
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
                seen += xb.shape[0]
        rate = seen / (time.perf_counter() - t0)
        model.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in torch.utils.data.DataLoader(test_set, batch_size=1000):
                correct += (model(xb.to(device)).argmax(1) == yb.to(device)).sum().item()
        return rate, correct / len(test_set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets" / "mnist"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = engine.resolve_device(args.device)
    cfg = RunConfig(dataset="mnist", data_dir=args.data_dir, val_fraction=0.0, model="mnist_pool",
                    optimizer="adam", lr=1e-3, batch_size=args.batch_size, epochs=args.epochs,
                    device=str(device), seed=0)
    ds = datasets.dataset_for(cfg)  # loaded before timing, as a search worker has it cached
    print(f"MNIST, mnist_pool ({models.count_parameters(models.build_model(cfg, ds.in_shape, 10)):,} params), "
          f"Adam 1e-3, batch {cfg.batch_size}, {cfg.epochs} epoch(s), device {device}, "
          f"{torch.get_num_threads()} threads")

    rate_a, acc_a = seed_loop(cfg, Path(args.data_dir) / "MNIST" / "raw", device)
    print(f"{'(a) DataLoader + PIL + ToTensor/Normalize:':42s} {rate_a:8.0f} samples/s   test acc {acc_a:.2%}")
    # (b) as the search runs it (precision auto), and in fp32 when auto picked bf16, so the share
    # of the speed-up that comes from bf16 is visible.
    runs = [cfg] + ([cfg.replace(precision="fp32")] if engine.uses_bf16("auto", device) else [])
    for run_cfg in runs:
        result = engine.fit(run_cfg, dataset=ds, evaluate_test=True)
        seconds = sum(h["train_seconds"] for h in result.history)
        rate_b = len(ds.train_y) * cfg.epochs / seconds
        label = f"(b) fit, {run_cfg.precision} -> {result.precision}, channels_last:"
        print(f"{label:42s} {rate_b:8.0f} samples/s   test acc {result.test_acc:.2%}")
        print(f"    speed ratio (b)/(a): {rate_b / rate_a:.2f}x   accuracy difference (b)-(a): "
              f"{(result.test_acc - acc_a) * 100:+.2f} points")

if __name__ == "__main__":
    main()
