#!/usr/bin/env bash
# Reproduce docs/results.md: the three shipped MNIST studies at a CPU-sized budget, then the
# exported winner of each trained on all 60,000 training images over 3 seeds.
#   scripts/results_mnist.sh [MNIST_DIR] [OUT_DIR]
# A CPU budget that fits one 2-core session (overrides of the shipped file, nothing else
# changed): 6 trials (the study's 2 enqueued starts, then TPE), a 5,000-image training subset,
# 3 epochs a trial, scored on the full 6,000-image validation split; final training of the
# exported winner: all 54,000 training images, 10 epochs, seeds 0-2, the 10,000-image test
# split read once per seed. With a GPU, drop the overrides. FAMILIES picks a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
mnist=${1:-../shared/datasets/mnist}
out=${2:-runs/results}
mkdir -p "$out"
storage="sqlite:///$out/results.db"
cnnsearch=".venv/bin/cnnsearch"
for family in ${FAMILIES:-pooling adaptive convfc}; do
    name="mnist_${family}_cpu"
    /usr/bin/time -f "search wall %e s" $cnnsearch run "studies/mnist_${family}.toml" --storage "$storage" \
        --device cpu --quiet --set "study.name=$name" --set study.n_trials=6 \
        --set data.subset=5000 --set fixed.epochs=3 --set "data.data_dir=$mnist"
    $cnnsearch export "$name" --storage "$storage" -o "$out/$name.json"
    /usr/bin/time -f "final wall %e s" $cnnsearch train "$out/$name.json" --set subset=null --epochs 10 --seeds 3 --device cpu --out "$out/$name"
done
