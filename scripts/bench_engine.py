"""Seed-notebook training loop vs `search.engine.fit`, side by side in one process.

(a) the seeds' way: PIL images + ToTensor + Normalize in a DataLoader(batch_size=32,
    shuffle=True), a plain PyTorch loop;
(b) `fit`: the same network, optimizer (Adam 1e-3), batch size, epochs and training images,
    with the dataset held on the device as uint8;
(c) with --compile: `fit` with `compile = true` (torch.compile, inductor);
(d) CIFAR-10, where precision auto trains in bf16: `fit` in fp32, since whether bf16 pays
    depends on the chip (AMX, or AVX512-BF16 alone), not only on its flags;
(e) on a GPU: `fit` with `cuda_graph = false`, each step's kernels launched one by one.
MNIST (the default): all 60,000 training images, --epochs times each, scored on the 10,000 test
images. The runs alternate epoch by epoch (a b e a b e ...: one round is one epoch of each), so
load on a shared machine hits them alike; with 2 epochs or more the median of the per-round
ratios after the first round is printed too (the first carries one-off costs: a GPU's first
kernels, cuDNN's algorithm choices, graph capture, compilation).
CIFAR-10 (`--dataset cifar10`, the JPEG q75 copy, model cifar_sixconv, flip augmentation):
--train-images of them, the three alternated in --rounds short rounds (a b c a b c ...), each
reported by its median; (c)'s compile time and its break-even on all 50,000 images come apart.
Round r trains each from seed r, so the rounds' test accuracies are a spread over seeds: each
one's mean and standard deviation, and (b) and (c) against (a) seed by seed (mean difference and
its standard error), say whether they reach equal accuracy; --epochs sets the runs' length.

    python scripts/bench_engine.py --data-dir ../shared/datasets/mnist --epochs 2
    python scripts/bench_engine.py --dataset cifar10 --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

import models
from search import datasets, engine
from search.augment import Normalizer
from search.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
CIFAR_ZIP = "cifar10-jpeg/cifar10-jpeg.zip"
CIFAR_LABEL = "CIFAR-10 (JPEG q75 copy)"
CIFAR_TRAIN = 50_000  # the full training set the break-even is counted on


class SeedLoop:
    """The seed notebooks' training, one epoch per `epoch()` call, so rounds can interleave."""

    def __init__(self, cfg: RunConfig, raw_dir: Path, device: torch.device, tmp: str):
        # torchvision's MNIST reads the uncompressed idx files; unpack a copy, never the shared data.
        (Path(tmp) / "MNIST" / "raw").mkdir(parents=True)
        for gz in raw_dir.glob("*-ubyte.gz"):
            with gzip.open(gz) as src, open(Path(tmp) / "MNIST" / "raw" / gz.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        train_set = torchvision.datasets.MNIST(tmp, train=True, download=False, transform=tf)
        self.test_set = torchvision.datasets.MNIST(tmp, train=False, download=False, transform=tf)
        # its own shuffling stream: fit, run between its epochs, sets the global one
        self.loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                                  generator=torch.Generator().manual_seed(cfg.seed))
        torch.manual_seed(cfg.seed)
        self.model = models.build_model(cfg, (1, 28, 28), 10).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.loss_fn, self.device = nn.CrossEntropyLoss(), device

    def epoch(self) -> float:
        """One training epoch; its samples/s."""
        self.model.train()
        seen, t0 = 0, time.perf_counter()
        for xb, yb in self.loader:
            xb, yb = xb.to(self.device), yb.to(self.device)
            self.opt.zero_grad()
            self.loss_fn(self.model(xb), yb).backward()
            self.opt.step()
            seen += xb.shape[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the epoch's queued kernels belong to it
        return seen / (time.perf_counter() - t0)

    def test(self) -> float:
        self.model.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in torch.utils.data.DataLoader(self.test_set, batch_size=1000):
                correct += (self.model(xb.to(self.device)).argmax(1) == yb.to(self.device)).sum().item()
        return correct / len(self.test_set)


class PILImages(torch.utils.data.Dataset):
    """The notebooks' dataset: decoded PIL images in memory, transformed one sample at a time."""

    def __init__(self, images: list, labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def machine(device: torch.device) -> str:
    """What the ratios depend on most: the CPU's vector units and whether precision auto gets bf16."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU kernels {torch.backends.cpu.get_cpu_capability()}"
    bf16 = engine.native_bf16(device)
    return f"{where}; bf16 {'native: precision auto trains in bf16' if bf16 else 'not native: precision auto trains in fp32'}"


def cifar_pil(zip_path: Path, train_x: torch.Tensor, class_names) -> tuple[tuple[list, list], list]:
    """The JPEGs decoded once with PIL: the images `train_x` holds (matched by their pixels, so
    both loops train on the same ones whatever order the folder loader reads), and the test set."""
    classes = {name: i for i, name in enumerate(class_names)}
    train, test = [], []
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            split, label, file = (name.split("/") + ["", ""])[:3]
            if file.endswith(".jpg") and split in ("train", "test"):
                img = Image.open(io.BytesIO(zf.read(name))).convert("RGB")
                (train if split == "train" else test).append((img, classes[label]))
    by_pixels = {np.asarray(img).tobytes(): (img, label) for img, label in train}
    picked = [by_pixels[x.permute(1, 2, 0).contiguous().numpy().tobytes()] for x in train_x.cpu()]
    return ([img for img, _ in picked], [label for _, label in picked]), test


def seed_loop_cifar(cfg: RunConfig, train, test, mean, std, device) -> dict:
    """The notebooks' CIFAR loop: samples/s after the first epoch, the first epoch's seconds, test accuracy."""
    norm = transforms.Normalize(mean, std)
    train_tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    loader = torch.utils.data.DataLoader(PILImages(*train, train_tf), batch_size=cfg.batch_size, shuffle=True)
    torch.manual_seed(cfg.seed)
    model = models.build_model(cfg, (3, 32, 32), 10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    seconds = []
    for _ in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        seconds.append(time.perf_counter() - t0)
    test_set = PILImages([img for img, _ in test], [label for _, label in test],
                         transforms.Compose([transforms.ToTensor(), norm]))
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in torch.utils.data.DataLoader(test_set, batch_size=1000):
            correct += (model(xb.to(device)).argmax(1) == yb.to(device)).sum().item()
    return timing(seconds, len(train[0])) | {"acc": correct / len(test_set)}


def timing(seconds: list[float], n: int) -> dict:
    """Steady samples/s (epochs after the first) and the first epoch's extra seconds over them:
    compilation, for (c)."""
    later = statistics.mean(seconds[1:])
    return {"rate": n / later, "extra": seconds[0] - later}


def fit_cifar(cfg: RunConfig, ds) -> dict:
    """As `timing`, plus the test evaluation's seconds: with compile, its graphs compile there."""
    t0 = time.perf_counter()
    result = engine.fit(cfg, dataset=ds, evaluate_test=True)
    seconds = [h["train_seconds"] for h in result.history]
    return timing(seconds, len(ds.train_y)) | {"acc": result.test_acc, "eval": time.perf_counter() - t0 - sum(seconds)}


def bench_cifar(args, device: torch.device) -> None:
    """(a) seed loop, (b) fit, (c) fit compiled on the same CIFAR-10 images, in alternating rounds."""
    data_dir = Path(args.data_dir or REPO.parent / "shared" / "datasets")
    epochs = max(2, args.epochs)  # the first epoch carries compilation: steady rates need a second
    cfg = RunConfig(dataset="folder", data_dir=str(data_dir), val_fraction=0.0, subset=args.train_images,
                    data_options={"path": CIFAR_ZIP, "image_size": 32, "channels": 3},
                    model="cifar_sixconv", optimizer="adam", lr=1e-3, batch_size=args.batch_size,
                    epochs=epochs, flip=True, device=str(device), seed=0)
    ds = datasets.to_device(datasets.dataset_for(cfg), device)  # loaded before timing, as a worker has it
    train, test = cifar_pil(data_dir / CIFAR_ZIP, ds.train_x, ds.classes)
    n_params = models.count_parameters(models.build_model(cfg, ds.in_shape, 10))
    print(f"{CIFAR_LABEL}, cifar_sixconv ({n_params:,} params), Adam 1e-3, flip, batch {cfg.batch_size}, "
          f"{len(ds.train_y):,} training images x {epochs} epochs, {args.rounds} rounds, device {device}, "
          f"{torch.get_num_threads()} threads; {machine(device)}")
    # round r trains every one from seed r: the rounds' accuracies are a spread over seeds, not one draw
    things = {"(a) DataLoader + PIL + torchvision transforms": lambda c: seed_loop_cifar(c, train, test, ds.mean,
                                                                                         ds.std, device),
              f"(b) fit, precision {cfg.precision}": lambda c: fit_cifar(c, ds)}
    if args.compile is not False:
        things[f"(c) fit, precision {cfg.precision}, compile"] = lambda c: fit_cifar(c.replace(compile=True), ds)
    if engine.uses_bf16(cfg.precision, device):  # whether bf16 pays depends on the chip, not only its flags
        things["(d) fit, precision fp32"] = lambda c: fit_cifar(c.replace(precision="fp32"), ds)
    runs: dict[str, list[dict]] = {label: [] for label in things}
    for r in range(args.rounds):
        for label, run in things.items():
            runs[label].append(run(cfg.replace(seed=r)))
            last = runs[label][-1]
            evaluation = f", test evaluation {last['eval']:.1f} s" if "eval" in last else ""
            print(f"  round {r + 1} {label[:3]}: {last['rate']:7.0f} samples/s, first epoch {last['extra']:+.1f} s "
                  f"over later ones{evaluation}, test acc {last['acc']:.2%}", flush=True)
    seed = [m["rate"] for m in runs[next(iter(runs))]]
    for label, ms in runs.items():
        ratio = statistics.median(m["rate"] / s for m, s in zip(ms, seed))
        print(f"{label + ':':52s} {statistics.median(m['rate'] for m in ms):7.0f} samples/s (median)  "
              f"{ratio:.2f}x the seed loop (median ratio)   {CIFAR_LABEL} test acc "
              f"{statistics.median(m['acc'] for m in ms):.2%}")
    print_accuracy(runs)
    by = {label[:3]: ms for label, ms in runs.items()}
    if "(d)" in by:
        ratios = [b["rate"] / d["rate"] for b, d in zip(by["(b)"], by["(d)"])]
        print(f"(b) bf16 / (d) fp32 by round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}x")
    if "(c)" in by:
        eager, compiled = by["(b)"], by["(c)"]
        # (c) against (b) of the same round: a shared CPU's load shifts between rounds, not within one
        ratios = [c["rate"] / e["rate"] for e, c in zip(eager, compiled)]
        print(f"(c)/(b) by round: {', '.join(f'{r:.2f}x' for r in ratios)}; median {statistics.median(ratios):.2f}x")
        eager_rate = statistics.median(m["rate"] for m in eager)
        print_break_even([c["extra"] - e["extra"] + c["eval"] - e["eval"] for e, c in zip(eager, compiled)],
                         eager_rate, eager_rate * statistics.median(ratios))


def print_accuracy(runs: dict[str, list[dict]]) -> None:
    """Each one's test accuracy over the rounds' seeds, and (b), (c) against (a) seed by seed: the
    mean difference and its standard error, what "equal accuracy" can be judged by."""
    accs = {label: [m["acc"] * 100 for m in ms] for label, ms in runs.items()}
    seed = next(iter(accs.values()))
    for label, acc in accs.items():
        spread = f" +- {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        line = f"{label[:3]} test acc {statistics.mean(acc):.2f}%{spread} over {len(acc)} seed(s) ({CIFAR_LABEL})"
        if acc is not seed:
            diffs = [b - a for a, b in zip(seed, acc)]
            se = f" +- {statistics.stdev(diffs) / len(diffs) ** 0.5:.2f} (standard error)" if len(diffs) > 1 else ""
            line += f"; {label[1]} - a, same seed: {statistics.mean(diffs):+.2f} points{se}"
        print(line)


def print_break_even(extras: list[float], eager_rate: float, compiled_rate: float) -> None:
    """Compile time and how many 50,000-image epochs repay it. Compile time: what (c)'s first epoch
    and test evaluation take beyond (b)'s, the evaluation's share being its graphs' compilation."""
    print(f"compile time ((c)'s first epoch + test evaluation beyond (b)'s), by round: "
          f"{', '.join(f'{e:.1f} s' for e in extras)} (round 1 compiles; later rounds reuse this process's graphs)")
    saved = CIFAR_TRAIN / eager_rate - CIFAR_TRAIN / compiled_rate  # seconds per full epoch
    if saved <= 0:
        print(f"break-even: never, compiled is not faster ({compiled_rate:.0f} vs {eager_rate:.0f} samples/s)")
    else:
        print(f"break-even: {extras[0] / saved:.1f} epochs of {CIFAR_TRAIN:,} images repay round 1's "
              f"{extras[0]:.1f} s compile ({saved:.1f} s saved per epoch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    parser.add_argument("--data-dir", default=None, help="default: ../shared/datasets/mnist for mnist, "
                        "../shared/datasets (holding cifar10-jpeg/) for cifar10")
    parser.add_argument("--epochs", type=int, default=1, help="mnist: 2 or more also gives the ratio after the first; cifar10: at least 2")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time fit with compile = true (default: on for cifar10, off for mnist)")
    parser.add_argument("--train-images", type=int, default=5000, help="cifar10: training images per round")
    parser.add_argument("--rounds", type=int, default=3, help="cifar10: rounds of (a) (b) (c)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = engine.resolve_device(args.device)
    if args.dataset == "cifar10":
        bench_cifar(args, device)
        return
    args.data_dir = args.data_dir or str(REPO.parent / "shared" / "datasets" / "mnist")
    cfg = RunConfig(dataset="mnist", data_dir=args.data_dir, val_fraction=0.0, model="mnist_pool",
                    optimizer="adam", lr=1e-3, batch_size=args.batch_size, epochs=args.epochs,
                    device=str(device), seed=0)
    ds = datasets.dataset_for(cfg)  # loaded before timing, as a search worker has it cached
    print(f"MNIST, mnist_pool ({models.count_parameters(models.build_model(cfg, ds.in_shape, 10)):,} params), "
          f"Adam 1e-3, batch {cfg.batch_size}, {cfg.epochs} epoch(s), device {device}, "
          f"{torch.get_num_threads()} threads; {machine(device)}")

    # (b) as the search runs it (precision auto; CUDA graphs on a GPU), and in fp32 when auto
    # picked bf16, so the share of the speed-up that comes from bf16 is visible; (e) on a GPU,
    # the same steps launched eager (cuda_graph = false), so the graphs' share is visible too.
    runs = [cfg] + ([cfg.replace(precision="fp32")] if engine.uses_bf16("auto", device) else [])
    runs += [cfg.replace(cuda_graph=False)] if engine.graph_blocker(cfg, device) is None else []
    runs += [cfg.replace(compile=True)] if args.compile else []
    ds_dev = datasets.to_device(ds, device)
    states = [engine.TrainState.start(run_cfg, ds_dev, device) for run_cfg in runs]
    epochs = [engine.train_epochs(state, ds_dev) for state in states]
    rates_a, rates_b = [], [[] for _ in runs]
    with tempfile.TemporaryDirectory() as tmp:
        seed = SeedLoop(cfg, Path(args.data_dir) / "MNIST" / "raw", device, tmp)
        for _ in range(cfg.epochs):  # one round: an epoch of each, in the same order every round
            rates_a.append(seed.epoch())
            for rates, run in zip(rates_b, epochs):
                rates.append(len(ds.train_y) / next(run)["train_seconds"])
        acc_a = seed.test()
    rate_a = overall(rates_a)
    print(f"{'(a) DataLoader + PIL + ToTensor/Normalize:':42s} {rate_a:8.0f} samples/s   test acc {acc_a:.2%}")
    for run_cfg, state, rates in zip(runs, states, rates_b):
        norm = Normalizer(ds.mean, ds.std, device)
        _, test_acc = engine.evaluate(state.model, ds_dev.test_x, ds_dev.test_y, norm,
                                      bf16=engine.uses_bf16(run_cfg.precision, device), forward=state.forward)
        rate_b = overall(rates)
        letter = "c" if run_cfg.compile else "b" if run_cfg.cuda_graph else "e"
        which = {"c": "(c) fit compiled (compile time included),", "b": "(b) fit,",
                 "e": "(e) fit eager (cuda_graph = false),"}[letter]
        steps = "CUDA graphs" if state.graph_replays else "eager steps"
        precision = "bf16" if engine.uses_bf16(run_cfg.precision, device) else "fp32"
        label = f"{which} {run_cfg.precision} -> {precision}, channels_last, {steps}:"
        print(f"{label:42s} {rate_b:8.0f} samples/s   test acc {test_acc:.2%}")
        pair = f"({letter})/(a)"
        print(f"    speed ratio {pair}: {rate_b / rate_a:.2f}x   accuracy difference {pair.replace('/', '-')}: "
              f"{(test_acc - acc_a) * 100:+.2f} points")
        if cfg.epochs >= 2:
            # the first round carries one-off costs (a GPU's first kernels, cuDNN's choices, capture, compilation)
            later = [b / a for a, b in zip(rates_a[1:], rates[1:])]
            print(f"    after the first epoch: (a) {overall(rates_a[1:]):.0f}, {pair[:3]} {overall(rates[1:]):.0f} "
                  f"samples/s; per round {', '.join(f'{r:.2f}x' for r in later)}; "
                  f"speed ratio after the first epoch {pair}: {statistics.median(later):.2f}x (median of "
                  f"{len(later)} round{'s' if len(later) > 1 else ''})")


def overall(rates: list[float]) -> float:
    """Samples/s over equal-sized epochs run at `rates`: total samples over total time."""
    return len(rates) / sum(1 / r for r in rates)


if __name__ == "__main__":
    main()
