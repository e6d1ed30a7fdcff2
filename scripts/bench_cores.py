"""What a launched CPU worker gains when it takes a waiting worker's cores (search/cores.py).

One training run (a final-stage CIFAR net on the JPEG q75 copy, or --dataset digits, which
ships with scikit-learn) alternates its epochs between 1 torch thread (its share while the other
worker trains) and --threads (every core, once the other waits): 1 N 1 N ..., so load on a
shared machine hits both alike. Prints each round's ratio and their median: how much faster
the seed runs of the final stage, or a search's last trial, train on this machine. --load N
starts N other processes that keep one core busy each, as a second worker (or anything else)
would: what the extra threads cost where the cores are not free. Run it once with
OMP_WAIT_POLICY=PASSIVE in the environment to see what OpenMP's spinning threads do.

    python scripts/bench_cores.py --threads 2 --rounds 4
    python scripts/bench_cores.py --threads 2 --rounds 4 --load 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from search import datasets, engine
from search.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("cifar10", "digits"), default="cifar10")
    parser.add_argument("--model", default="cifar_sixconv_bn")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="all cores (default: os.cpu_count())")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--load", type=int, default=0, help="other processes keeping a core busy each")
    args = parser.parse_args()
    burn = "import torch\ntorch.set_num_threads(1)\nx = torch.randn(512, 512)\nwhile True: x = (x @ x).tanh()\n"
    loads = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(args.load)]
    try:
        bench(args)
    finally:
        for proc in loads:
            proc.kill()
            proc.wait()


def bench(args) -> None:
    if args.dataset == "cifar10":
        cfg = RunConfig(dataset="folder", data_dir=str(REPO.parent / "shared" / "datasets"),
                        data_options={"path": "cifar10-jpeg/cifar10-jpeg.zip", "image_size": 32, "channels": 3},
                        model=args.model, flip=True, crop_padding=4)
    else:
        cfg = RunConfig(dataset="digits", model="convnet")
    cfg = cfg.replace(subset=args.train_images, val_fraction=0.0, batch_size=args.batch_size,
                      epochs=2 * args.rounds + 1, device="cpu", optimizer="adam", lr=1e-3)
    ds = datasets.to_device(datasets.dataset_for(cfg), torch.device("cpu"))
    state = engine.TrainState.start(cfg, ds, torch.device("cpu"))
    epochs = engine.train_epochs(state, ds)
    torch.set_num_threads(1)
    next(epochs)  # warm-up: the first epoch carries one-off costs
    print(f"{cfg.dataset} {cfg.model}, {len(ds.train_y):,} training images, batch {cfg.batch_size}, "
          f"precision {cfg.precision}; 1 thread against {args.threads}, {args.rounds} rounds, {args.load} "
          f"busy process(es) beside, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    ratios = []
    for r in range(args.rounds):
        rates = []
        for threads in (1, args.threads):
            torch.set_num_threads(threads)
            rates.append(next(epochs)["samples_per_s"])
        ratios.append(rates[1] / rates[0])
        print(f"  round {r + 1}: 1 thread {rates[0]:7.0f} samples/s, {args.threads} threads {rates[1]:7.0f}: "
              f"{ratios[-1]:.2f}x", flush=True)
    print(f"median: {statistics.median(ratios):.2f}x with {args.threads} threads against 1")


if __name__ == "__main__":
    main()
