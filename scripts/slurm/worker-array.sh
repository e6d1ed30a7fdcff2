#!/bin/bash
# cnnsearch workers as a Slurm array: one task per GPU, all on the same study and database.
#
#   export CNNSEARCH_STORAGE=postgresql+psycopg://cnnsearch@db.example.org/cnnsearch   # password in ~/.pgpass
#   cnnsearch create studies/mnist_pooling.toml                                        # once, from a login node
#   sbatch --array=0-7 scripts/slurm/worker-array.sh mnist_pooling
#
# Each task stops when the study's global budget is reached; a task killed at its time limit
# has its running trial failed by the heartbeat and retried by another task.
#SBATCH --job-name=cnnsearch-worker
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --output=cnnsearch-worker-%A_%a.log
set -euo pipefail

STUDY="${1:?usage: sbatch scripts/slurm/worker-array.sh STUDY_NAME}"
: "${CNNSEARCH_STORAGE:?set CNNSEARCH_STORAGE, e.g. postgresql+psycopg://user@host/db}"
export CNNSEARCH_THREADS="${SLURM_CPUS_PER_TASK:-4}"  # torch CPU threads: the task's cores, no more

# Slurm sets CUDA_VISIBLE_DEVICES to the task's GPU, so the worker's device "auto" is that GPU.
# The array index shifts the sampler seed: tasks explore differently even when started together.
srun cnnsearch worker "$STUDY" --storage "$CNNSEARCH_STORAGE" --quiet \
    --seed-offset "${SLURM_ARRAY_TASK_ID:-0}"
