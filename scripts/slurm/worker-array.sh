#!/bin/bash
# cnnsearch workers as a Slurm array: one task per GPU, all on the same study and database.
#
#   export CNNSEARCH_STORAGE=postgresql+psycopg://cnnsearch@db.example.org/cnnsearch   # password in ~/.pgpass
#   cnnsearch create studies/mnist_pooling.toml                                        # once, from a login node
#   sbatch --array=0-7 scripts/slurm/worker-array.sh mnist_pooling
#
# or, with the password in the URL, keep the URL in a file only you can read:
#   (umask 077; echo 'postgresql+psycopg://cnnsearch:PASSWORD@db.example.org/cnnsearch' > ~/.cnnsearch-storage)
#   export CNNSEARCH_STORAGE_FILE=~/.cnnsearch-storage                                  # refused unless mode 0600
#
# The URL reaches the workers through the environment (sbatch passes it on), never their command
# line: `ps` shows every command line on a node to every user of the cluster.
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
if [[ -z "${CNNSEARCH_STORAGE:-}" && -z "${CNNSEARCH_STORAGE_FILE:-}" ]]; then
    echo "set CNNSEARCH_STORAGE (e.g. postgresql+psycopg://user@host/db) or CNNSEARCH_STORAGE_FILE" >&2
    exit 1
fi
export CNNSEARCH_THREADS="${SLURM_CPUS_PER_TASK:-4}"  # torch CPU threads: the task's cores, no more

# Slurm sets CUDA_VISIBLE_DEVICES to the task's GPU, so the worker's device "auto" is that GPU.
# Each task claims the next worker index free in the database (no --worker-index): it shifts the
# sampler seed, so tasks explore differently even when started together, and no two tasks share
# one, not across two sbatch runs nor for a requeued task. The index is recorded with each trial.
# The worker reads CNNSEARCH_STORAGE (or CNNSEARCH_STORAGE_FILE) itself: no --storage here.
srun cnnsearch worker "$STUDY" --quiet
