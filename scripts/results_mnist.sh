#!/usr/bin/env bash
# Reproduce docs/results.md: the three shipped MNIST studies at a CPU-sized budget, then the
# exported winner of each trained on the 54,000 training images (the validation split stays
# out) over 3 seeds.
#   scripts/results_mnist.sh [MNIST_DIR] [OUT_DIR]
# A CPU budget (overrides of the shipped file, nothing else changed; measured 2026-12-01: about
# 2.5 hours on 2 cores as two chains side by side, conv+fc's final training the longest at 73
# min): 12 trials (the study's 2 enqueued starts, 6 random ones, then TPE), a 10,000-image
# training subset, 4 epochs a trial, scored on the full 6,000-image validation split, the
# shipped MedianPruner; final training of the exported winner: all 54,000 training images,
# 12 epochs, seeds 0-2, the 10,000-image test split read once per seed. With a GPU, drop the
# overrides. FAMILIES picks a subset; THREADS sets torch's threads (default 1: run families
# side by side, one core each).
set -euo pipefail
cd "$(dirname "$0")/.."
mnist=${1:-../shared/datasets/mnist}
out=${2:-runs/results}
mkdir -p "$out"
export OMP_NUM_THREADS=${THREADS:-1}
cnnsearch=".venv/bin/cnnsearch"
for family in ${FAMILIES:-pooling adaptive convfc}; do
    name="mnist_${family}_cpu"
    storage="sqlite:///$out/$name.db"  # one file per family: families can run at the same time
    /usr/bin/time -f "search wall %e s" $cnnsearch run "studies/mnist_${family}.toml" --storage "$storage" \
        --device cpu --quiet --set "study.name=$name" --set study.n_trials=12 \
        --set sampler.kwargs.n_startup_trials=6 \
        --set data.subset=10000 --set fixed.epochs=4 --set "data.data_dir=$mnist"
    $cnnsearch export "$name" --storage "$storage" -o "$out/$name.json"
    /usr/bin/time -f "final wall %e s" $cnnsearch train "$out/$name.json" --set subset=null --epochs 12 \
        --seeds 3 --device cpu --out "$out/$name"
done
