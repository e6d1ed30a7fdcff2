"""Kill `cnnsearch train` with SIGKILL and resume it: how much work is lost, and is the result the same?

Trains a small model on a synthetic dataset (32x32 RGB images; the CPU unless --device) as a
`python -m search.cli train` subprocess, once without interruption (the reference weights), then
once more killed with SIGKILL `--kills` times at random points inside its epochs (`--seed` picks
them: an epoch, then a moment within it) and restarted each time with `train --resume DIR`.
Epochs lost are measured, not assumed: after each kill, the epochs the killed run had begun (its
printed epoch lines, plus the one it was in) less the epochs its checkpoint.pt holds. At the end,
model.pt's every tensor is compared with the reference's by torch.equal.
On another device (`--device cuda`) bitwise equality is not promised (cuDNN picks its
algorithms per process, and some are not deterministic): there the line also gives the largest
absolute difference, and says `equal within tolerance` when every tensor passes
torch.allclose(rtol=1e-3, atol=1e-5) without being bitwise equal.

    .venv/bin/python scripts/bench_resume.py --quick      # under 2 minutes on 2 CPU cores
    .venv/bin/python scripts/bench_resume.py --kills 5 --seed 3
    python3 scripts/bench_resume.py --quick --device cuda   # on a GPU machine

The last line: `resume: K kills, lost L epochs in all (<= K), final weights equal to uninterrupted: yes|no`
(with --device cuda: `yes (bitwise)`, `equal within tolerance` or `no`, then the difference).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EPOCH_LINE = re.compile(r"^epoch\s+(\d+)/(\d+) .* ([\d.]+)s \(")


def start(args: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "search.cli", "train", *args, "--threads", str(threads)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def epochs_printed(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for m in map(EPOCH_LINE.match, lines) if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    parser.add_argument("--epochs", type=int, default=None, help="default 10, 6 with --quick")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smaller run: under 2 minutes on 2 cores")
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N: where both runs train")
    args = parser.parse_args()
    epochs = args.epochs or (6 if args.quick else 10)
    if not 1 <= args.kills <= epochs:
        parser.error(f"--kills: 1 to --epochs ({epochs})")
    rng = random.Random(args.seed)
    cfg = {"dataset": "synthetic", "epochs": epochs, "batch_size": 32, "device": args.device, "seed": 0,
           "data_options": {"n": 4000 if args.quick else 10000, "classes": 4, "size": 32, "channels": 3}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_resume-") as tmp:
        tmp = Path(tmp)
        (tmp / "c.json").write_text(json.dumps(cfg))
        ref = start([str(tmp / "c.json"), "--out", str(tmp / "ref")], args.threads)
        ref_lines = ref.communicate()[0].splitlines()
        if ref.returncode:
            sys.exit("reference run failed:\n" + "\n".join(ref_lines[-20:]))
        epoch_s = max(0.05, min(float(EPOCH_LINE.match(ln).group(3)) for ln in ref_lines if EPOCH_LINE.match(ln)))
        print(f"reference: {epochs} epochs, {epoch_s:.2f}s for the fastest one")

        # the epoch (0-based) each kill lands in, and how far into it: distinct and increasing, so
        # each kill hits the run resumed after the one before
        targets = sorted(rng.sample(range(epochs), args.kills))
        run_dir, lost, printed_all, kills = tmp / "cut", 0, [], 0
        position = 0  # epochs in the checkpoint
        for target in targets:
            fresh = not (run_dir / "checkpoint.pt").exists()  # none yet: start again from scratch
            proc = start([str(tmp / "c.json"), "--out", str(run_dir)] if fresh else ["--resume", str(run_dir)],
                         args.threads)
            lines = []
            for line in proc.stdout:  # until the line that says epoch `target` is about to begin
                lines.append(line.rstrip("\n"))
                done = epochs_printed(lines)
                if (done and done[-1] == target) or (target == position and line.startswith("data:")):
                    break
            time.sleep(rng.uniform(0.05, 0.8) * epoch_s)
            proc.send_signal(signal.SIGKILL)
            lines += proc.communicate()[0].splitlines()
            kills += 1
            begun = epochs_printed(lines)
            printed_all += begun
            reached = (begun[-1] if begun else position) + 1  # the epoch it was in counts as begun
            from search.errors import CnnsearchError
            from search.final import resume_point
            try:
                saved = resume_point(run_dir).epoch
            except CnnsearchError:
                saved = 0  # killed before its first checkpoint
            lost += reached - saved
            print(f"kill {kills}: during epoch {reached}/{epochs}, checkpoint holds {saved} epochs "
                  f"(lost {reached - saved})")
            position = saved
        fresh = not (run_dir / "checkpoint.pt").exists()
        proc = start([str(tmp / "c.json"), "--out", str(run_dir)] if fresh else ["--resume", str(run_dir)],
                     args.threads)
        lines = proc.communicate()[0].splitlines()
        if proc.returncode:
            sys.exit("the last resume failed:\n" + "\n".join(lines[-20:]))
        printed_all += epochs_printed(lines)
        repeated = len(printed_all) - epochs
        print(f"epoch lines printed over all runs: {len(printed_all)} for {epochs} epochs "
              f"({repeated} finished epochs printed twice)")

        import torch

        a = torch.load(tmp / "ref" / "model.pt", weights_only=True)["state_dict"]
        b = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        verdict = "yes" if equal else "no"
        if args.device != "cpu" and a.keys() == b.keys():  # the CPU promise stays bitwise; elsewhere say how far
            floats = [k for k in a if a[k].is_floating_point()]
            diff = max((float((a[k].float() - b[k].float()).abs().max()) for k in floats if a[k].numel()), default=0.0)
            scale = max((float(a[k].float().abs().max()) for k in floats if a[k].numel()), default=0.0)
            close = all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5) if k in floats
                        else torch.equal(a[k], b[k]) for k in a)
            verdict = ("yes (bitwise)" if equal else "equal within tolerance" if close else "no") + \
                f" (max abs diff {diff:.3g}, largest weight {scale:.3g}, on {args.device})"
        left = (run_dir / "checkpoint.pt").exists()
    print(f"wall time {time.perf_counter() - t_all:.1f}s" + ("; checkpoint.pt left behind!" if left else ""))
    print(f"resume: {kills} kills, lost {lost} epochs in all (<= {kills}), "
          f"final weights equal to uninterrupted: {verdict}")


if __name__ == "__main__":
    main()
