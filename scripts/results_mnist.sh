#!/usr/bin/env bash
# Reproduce docs/results.md's MNIST results with nobody in the loop: for each family,
# `cnnsearch run` on the shipped study at a CPU-sized search budget, which ends with the study's
# own final stage ([final]: the 3 best trials and the hand-tuned start trained 12 epochs on all
# 54,000 training images, the best on validation then over 3 seeds, the test split read once
# per seed); then `export --model` writes the final model, `status` prints the figures.
#   scripts/results_mnist.sh [MNIST_DIR] [OUT_DIR]
# The search budget overrides the shipped file (60 trials, all images, 8 epochs a trial, which
# needs a GPU): 12 trials (the 2 enqueued starts, 4 random, then TPE), a 10,000-image training
# subset, 4 epochs a trial, scored on the full 6,000-image validation split, the shipped
# MedianPruner. The final stage runs as shipped. FAMILIES picks families (default: all three);
# THREADS sets torch's threads (default 2); RUN names the studies (default: auto). WORKERS=N runs
# N worker processes instead of one (`cnnsearch create`, then `cnnsearch launch --cpus N`, which
# splits the cores between them; their logs go to OUT_DIR/logs-NAME): on 2 cores, two 1-thread
# workers finish the final stage's independent runs sooner than one 2-thread worker.
# (scripts/results_mnist_handprotocol.sh is the earlier, hand-run protocol, kept as history.)
set -euo pipefail
cd "$(dirname "$0")/.."
mnist=${1:-../shared/datasets/mnist}
out=${2:-runs/results}
mkdir -p "$out"
cnnsearch=".venv/bin/cnnsearch"
for family in ${FAMILIES:-pooling adaptive convfc}; do
    name="mnist_${family}_${RUN:-auto}"
    storage="sqlite:///$out/$name.db"  # one file per family: families can run at the same time
    budget=(--set "study.name=$name" --set study.n_trials=12 --set sampler.kwargs.n_startup_trials=6
            --set data.subset=10000 --set fixed.epochs=4 --set "data.data_dir=$mnist")
    if [ "${WORKERS:-1}" -gt 1 ]; then
        $cnnsearch create "studies/mnist_${family}.toml" --storage "$storage" "${budget[@]}"
        /usr/bin/time -f "search + final stage wall %e s" $cnnsearch launch "$name" --storage "$storage" \
            --cpus "$WORKERS" --log-dir "$out/logs-$name"
    else
        /usr/bin/time -f "search + final stage wall %e s" $cnnsearch run "studies/mnist_${family}.toml" \
            --storage "$storage" --device cpu --quiet --threads "${THREADS:-2}" "${budget[@]}"
    fi
    $cnnsearch export "$name" --storage "$storage" -o "$out/$name.json" --model "$out/$name-final.pt"
    $cnnsearch status "$name" --storage "$storage"
done
