"""What a test-time flip (`tta_flip = true`) gives a CIFAR net: the same trained model scored with
and without it, seed by seed, on the validation and the test images.

Each seed trains one run (the six-conv net with batchnorm, AdamW + one-cycle, flip, random
erasing and label smoothing by default: the CPU studies' winner; `--set key=value` changes any
of it) on --train-images of the CIFAR-10 (JPEG q75 copy) training images, then scores the
trained model both ways, plain and flipped alternating --rounds times for the timing. The
accuracies are paired (one model, two ways of asking it), so the difference and its standard
error over seeds say what the flip adds; the evaluation-time ratio says what it costs (two
forward passes an image).

    python scripts/bench_tta.py --seeds 3 --epochs 10 --train-images 15000
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from search import config, datasets, engine
from search.augment import Normalizer

REPO = Path(__file__).resolve().parents[1]
CIFAR_ZIP = "cifar10-jpeg/cifar10-jpeg.zip"
CIFAR_LABEL = "CIFAR-10 (JPEG q75 copy)"
RECIPE = {"model": "cifar_sixconv", "model_params": {"batchnorm": True, "dropout": [0.27, 0.36, 0.30],
                                                    "fc_dropout": 0.33},
          "optimizer": "adamw", "lr": 1.4e-3, "weight_decay": 5e-4, "scheduler": "onecycle",
          "batch_size": 64, "label_smoothing": 0.1, "flip": True, "erasing": 0.23}


def mean_se(values: list[float]) -> str:
    if len(values) < 2:
        return f"{statistics.fmean(values):+.2f}"
    return f"{statistics.fmean(values):+.2f} ± {statistics.stdev(values) / len(values) ** 0.5:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--train-images", type=int, default=15000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="timed evaluations of each kind per seed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    values = config.merge({**RECIPE, "dataset": "folder", "data_dir": args.data_dir, "subset": args.train_images,
                           "data_options": {"path": CIFAR_ZIP, "image_size": 32, "channels": 3},
                           "epochs": args.epochs, "device": "cpu"}, config.parse_overrides(args.sets))
    cfg = config.from_dict(values)
    ds = datasets.dataset_for(cfg)
    device = torch.device("cpu")
    norm = Normalizer(ds.mean, ds.std, device)
    bf16 = engine.uses_bf16(cfg.precision, device)
    print(f"{CIFAR_LABEL}: {cfg.model} {cfg.model_params}, {cfg.optimizer} {cfg.lr:g}, {cfg.scheduler}, "
          f"{len(ds.train_y):,} training images x {cfg.epochs} epochs, {args.seeds} seeds; validation "
          f"{len(ds.val_y):,} and test {len(ds.test_y):,} images scored plain and with a test-time flip, "
          f"{torch.get_num_threads()} threads", flush=True)
    gains: dict[str, list[float]] = {"val": [], "test": []}
    cost = []
    for seed in range(args.seeds):
        result = engine.fit(cfg.replace(seed=seed), dataset=ds)
        line = [f"seed {seed}: train {sum(h['train_seconds'] for h in result.history):.0f} s"]
        for split, x, y in (("val", ds.val_x, ds.val_y), ("test", ds.test_x, ds.test_y)):
            plain = engine.evaluate(result.model, x, y, norm, bf16=bf16)[1]
            flipped = engine.evaluate(result.model, x, y, norm, bf16=bf16, tta_flip=True)[1]
            gains[split].append(100 * (flipped - plain))
            line.append(f"{split} {plain:.2%} -> {flipped:.2%} ({gains[split][-1]:+.2f})")
        seconds = {False: [], True: []}
        for _ in range(args.rounds):  # plain, flipped, plain, flipped ...: load hits both alike
            for flip in (False, True):
                t0 = time.perf_counter()
                engine.evaluate(result.model, ds.test_x, ds.test_y, norm, bf16=bf16, tta_flip=flip)
                seconds[flip].append(time.perf_counter() - t0)
        cost.append(statistics.median(f / p for p, f in zip(seconds[False], seconds[True])))
        print("  " + ", ".join(line) + f"; evaluation {cost[-1]:.2f}x the time", flush=True)
    print(f"test-time flip, points of accuracy (mean ± standard error over {args.seeds} seeds): "
          f"validation {mean_se(gains['val'])}, test {mean_se(gains['test'])}; "
          f"evaluation time {statistics.median(cost):.2f}x (median)")


if __name__ == "__main__":
    main()
