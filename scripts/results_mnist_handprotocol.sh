#!/usr/bin/env bash
# Reproduce docs/results.md: the three shipped MNIST studies at a CPU-sized budget, then the
# exported winner of each trained on the 54,000 training images (the validation split stays
# out) over 3 seeds.
#   scripts/results_mnist_handprotocol.sh [MNIST_DIR] [OUT_DIR]
# A CPU budget (overrides of the shipped file, nothing else changed; measured 2026-12-01: about
# 2.5 hours on 2 cores as two chains side by side, conv+fc's final training the longest at 73
# min): 12 trials (the study's 2 enqueued starts, 6 random ones, then TPE), a 10,000-image
# training subset, 4 epochs a trial, scored on the full 6,000-image validation split, the
# shipped MedianPruner; final training of the exported winner: all 54,000 training images,
# 12 epochs, seeds 0-2, the 10,000-image test split read once per seed. With a GPU, drop the
# overrides.
# FINALISTS=K (default 1) adds a step between search and final training: the K best trials
# are each trained at the final budget (seed 0) with --no-test, and the one with the best
# last-epoch validation accuracy is the one trained over 3 seeds. The test split is still read
# only by that last step. FAMILIES picks a subset; THREADS sets torch's threads (default 1:
# run families side by side, one core each); RUN names the studies (default: cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
mnist=${1:-../shared/datasets/mnist}
out=${2:-runs/results}
mkdir -p "$out"
export OMP_NUM_THREADS=${THREADS:-1}
cnnsearch=".venv/bin/cnnsearch"
final=(--set subset=null --epochs 12 --device cpu)
for family in ${FAMILIES:-pooling adaptive convfc}; do
    name="mnist_${family}_${RUN:-cpu}"
    storage="sqlite:///$out/$name.db"  # one file per family: families can run at the same time
    /usr/bin/time -f "search wall %e s" $cnnsearch run "studies/mnist_${family}.toml" --storage "$storage" \
        --device cpu --quiet --set "study.name=$name" --set study.n_trials=12 \
        --set sampler.kwargs.n_startup_trials=6 \
        --set data.subset=10000 --set fixed.epochs=4 --set "data.data_dir=$mnist"
    $cnnsearch export "$name" --storage "$storage" -o "$out/$name.json"
    if [ "${FINALISTS:-1}" -gt 1 ]; then
        best_val=-1
        for rank in $(seq 1 "$FINALISTS"); do
            $cnnsearch export "$name" --storage "$storage" --rank "$rank" -o "$out/$name-rank$rank.json"
            /usr/bin/time -f "finalist $rank wall %e s" $cnnsearch train "$out/$name-rank$rank.json" \
                "${final[@]}" --no-test --out "$out/$name-rank$rank"
            val=$(.venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['runs'][0]['final_val_acc'])" \
                "$out/$name-rank$rank/metrics.json")
            echo "finalist $rank: last-epoch val acc $val"
            if .venv/bin/python -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$val" "$best_val"; then
                best_val=$val
                cp "$out/$name-rank$rank.json" "$out/$name.json"
            fi
        done
        echo "chosen: $(.venv/bin/python -c "import json, sys; print('trial', json.load(open(sys.argv[1]))['provenance']['trial'])" "$out/$name.json"), last-epoch val acc $best_val"
    fi
    /usr/bin/time -f "final wall %e s" $cnnsearch train "$out/$name.json" "${final[@]}" \
        --seeds 3 --out "$out/$name"
done
