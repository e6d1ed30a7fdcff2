#!/usr/bin/env bash
# Reproduce docs/results.md's MNIST front after final training with nobody in the loop:
# `cnnsearch run` on studies/mnist_pareto.toml (validation accuracy against parameters) at a
# CPU-sized search budget, which ends with the study's own final stage: for each of its picks
# (at most 100,000, 25,000 and 400,000 parameters) the 2 best Pareto trials no larger trained 12
# epochs on all 54,000 training images, the better on validation then over 3 seeds, the test
# split read once per seed. Then `export --pick RULE --model` writes each pick's final model and
# `status` prints the figures.
#   scripts/results_pareto.sh [MNIST_DIR] [OUT_DIR]
# The search budget overrides the shipped 60 trials with N_TRIALS (default 24: the 3 enqueued
# family starts, 10 random, then TPE); everything else (20,000 training images, 4 epochs a trial,
# the size-band median pruner, [final]) runs as shipped. THREADS sets torch's threads (default 2);
# RUN names the study (default: auto). PICKS replaces the shipped picks (space-separated rules,
# e.g. PICKS="max_params=30000 max_params=60000 max_params=120000"); the exports follow them.
# WORKERS=N runs N worker processes (`cnnsearch create`, then `cnnsearch launch --cpus N`, which
# splits the cores between them; logs in OUT_DIR/logs-NAME), as scripts/results_mnist.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
mnist=${1:-../shared/datasets/mnist}
out=${2:-runs/results}
mkdir -p "$out"
cnnsearch=".venv/bin/cnnsearch"
name="mnist_pareto_${RUN:-auto}"
storage="sqlite:///$out/$name.db"
picks=(${PICKS:-max_params=100000 max_params=25000 max_params=400000})
toml_list=$(printf '"%s", ' "${picks[@]}")
budget=(--set "study.name=$name" --set "study.n_trials=${N_TRIALS:-24}" --set "data.data_dir=$mnist"
        --set "final.pick=[${toml_list%, }]")
if [ "${WORKERS:-1}" -gt 1 ]; then
    $cnnsearch create studies/mnist_pareto.toml --storage "$storage" "${budget[@]}"
    /usr/bin/time -f "search + final stage wall %e s" $cnnsearch launch "$name" --storage "$storage" \
        --cpus "$WORKERS" --log-dir "$out/logs-$name"
else
    /usr/bin/time -f "search + final stage wall %e s" $cnnsearch run studies/mnist_pareto.toml \
        --storage "$storage" --device cpu --quiet --threads "${THREADS:-2}" "${budget[@]}"
fi
for rule in "${picks[@]}"; do
    $cnnsearch export "$name" --storage "$storage" --pick "$rule" -o "$out/$name-$rule.json" \
        --model "$out/$name-$rule-final.pt"
done
$cnnsearch status "$name" --storage "$storage"
