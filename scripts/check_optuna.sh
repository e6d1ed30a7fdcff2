#!/usr/bin/env bash
# Run the tests that exercise search/storage.py (the one module that touches Optuna internals)
# against other Optuna releases, each installed beside the venv's, to see which ones pyproject's
# optuna range may admit. Usage: scripts/check_optuna.sh [VERSION ...]  (from the repo root)
set -uo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(4.0.0 4.5.0 4.9.0 5.0.0 5.1.0)
tests=(tests/test_storage.py tests/test_study.py tests/test_worker.py tests/test_layout.py)
for v in "${versions[@]}"; do
    target="${TMPDIR:-/tmp}/cnnsearch-optuna-$v"
    [ -d "$target/optuna" ] || .venv/bin/pip install -q --no-deps --target "$target" "optuna==$v" >/dev/null 2>&1 \
        || { echo "optuna $v: could not be installed"; continue; }
    if out=$(PYTHONPATH="$target" .venv/bin/python -m pytest -p no:cacheprovider -q -x "${tests[@]}" 2>&1); then
        echo "optuna $v: passed ($(echo "$out" | tail -1))"
    else
        echo "optuna $v: FAILED"; echo "$out" | grep -E "^(FAILED|ERROR|E )" | head -5
    fi
done
