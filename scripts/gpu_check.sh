#!/usr/bin/env bash
# The first thing to run on a lent GPU machine (one NVIDIA H100/H200): at most 8 minutes in all,
# every part under its own `timeout`, a failed part says FAILED with its exit code and the rest
# goes on, and a summary block at the end, one figure a line, to paste into docs/results.md.
# On a machine without CUDA it still runs (exit 0): the CUDA parts are skipped with the reason.
#
#   1. environment: nvidia-smi, python/torch/torchvision/optuna versions, torch.cuda.is_available()
#   2. the `gpu`-marked tests (python -m pytest -q -m gpu; they skip without CUDA)
#   3. scripts/bench_engine.py --device cuda --epochs 3: the engine vs the seed-style loop (target >= 15x),
#      the runs alternating epoch by epoch, judged on the median ratio of the rounds after the first
#      (the first carries a process's first CUDA calls, cuDNN's choices and the graph capture; the
#      H200's first run, 1 epoch, gave 2.2x with them inside), and over all epochs
#   4. scripts/bench_resume.py --quick --device cuda: SIGKILL + --resume, epochs lost, same weights?
#   5. `cnnsearch launch --gpus 0 --per-gpu 3` vs `--per-gpu 1` on studies/digits_quick.toml
#      (embedded digits, no download), each for a fixed window: trials per hour and their ratio.
#      Without CUDA the same comparison runs as `--cpus 3` vs `--cpus 1` (labelled CPU), so the
#      launch and measuring steps are exercised before any GPU time is spent on them.
#   6. the CIFAR final training: `cnnsearch train scripts/gpu_check_cifar.toml` (the six-conv
#      configuration the CIFAR study chose on the CPU, width 2, 2.2 M params) for CIFAR_EPOCHS
#      (default 30) on all 45,000 training images of the CIFAR-10 (JPEG q75 copy), tested once:
#      seconds an epoch, wall (data load and test included), test accuracy (the issue's bar on a
#      GPU: >= 93% for the six-conv family), and what 100 epochs (the shipped [final] budget)
#      would take. Budget B_CIFAR (default 300 s), outside the 8 minutes of parts 1-5.
#
# GPU_CHECK_PARTS picks parts (default "tests engine resume launch cifar"; the environment always
# runs). The CIFAR zip (59.3 MiB) cannot travel in the same call as MNIST and the wheels (a call
# carries at most 64 MiB), so part 6 is a second call of its own, right after the first while the
# machine is still warm; `cnnsearch train` needs no Optuna, so it carries no wheels and skips
# setup:
#   mkdir -p shared/datasets && cp -r ../shared/datasets/cifar10-jpeg shared/datasets/
#   GPU_CHECK_PARTS=cifar GPU_CHECK_OUT=$OUT bash scripts/gpu_check.sh    # ~60 MiB with the repo
#
#   bash scripts/gpu_check.sh                      # here, or on the GPU machine
#   GPU_CHECK_OUT=$OUT bash scripts/gpu_check.sh   # also copy summary.txt and the logs there
#
# Python: $PYTHON, else .venv/bin/python, else python3. When `import optuna` fails (the GPU
# machine's python3 has PyTorch but no Optuna), the missing packages are installed first: from
# the wheels in shared/wheels (or $WHEELS) when there are any, with pip --no-index --no-deps
# --target $CNNSEARCH_SITE (default /tmp/cnnsearch-site, put on PYTHONPATH), as
# /work/.library/device/README.md says; else from the package index. Then the project itself,
# `pip install --no-deps --no-build-isolation -e .` (the repo root is on PYTHONPATH regardless).
# The device machine reaches no index, so carry the wheels: inside the checkout, where shared/
# travels with the working tree (about 9 MB; Python 3.12 there):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d shared/wheels optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 mako==1.4.3 \
#     optuna-dashboard==0.21.0 bottle==0.13.4
#
# (typer, rich, numpy, tqdm, pyyaml, markupsafe, scikit-learn, matplotlib are already there.)
# bench_engine.py reads MNIST from $MNIST_DIR, else shared/datasets/mnist in the checkout, else
# ../shared/datasets/mnist; ../shared does not travel to the device machine, so copy it (12 MB):
#   mkdir -p shared/datasets && cp -r ../shared/datasets/mnist shared/datasets/
#
# Knobs: GPU_CHECK_DEVICE=cpu runs parts 3-4 and 6 on the CPU too (a dry run of the script's parsing;
# cpu:0 takes bench_resume's non-CPU reporting path), with B_ENGINE=400 B_RESUME=400 on a slow CPU
# (and CIFAR_EPOCHS=1 CIFAR_SUBSET=2000 for part 6; CIFAR_DIR: the folder holding cifar10-jpeg/;
# CIFAR_SET: space-separated key=value changes to part 6's configuration, e.g. scheduler=cosine,
# which CUDA graphs can capture where one-cycle cannot, and which the summary line names);
# LAUNCH_WINDOW: seconds each launch runs (default: what is left of the 470 s, 30 to 60).

set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
START=$SECONDS

# Budgets, seconds: each part's `timeout`. Together under 8 minutes (480 s): parts 0-4 have fixed
# ones; the two launch runs share what is left of LIMIT, each window 30-60 s (or LAUNCH_WINDOW).
# Each can be set from the environment (for a dry run on a slow CPU), at the caller's risk.
LIMIT=${LIMIT:-470}
B_SETUP=${B_SETUP:-35}        # pip install from wheels + the project, when optuna is missing
B_ENV=${B_ENV:-30}            # nvidia-smi 5, python the rest
B_TESTS=${B_TESTS:-80}      # 44.5 s on the H200 before the CUDA-graph tests
B_ENGINE=${B_ENGINE:-110}    # 3 rounds of 60,000 images, 4 runs: on the H200 about 15 s a seed-loop epoch, 6 s eager, 0.5 s graphed
B_RESUME=${B_RESUME:-80}      # 57 s on the H200
B_CREATE=${B_CREATE:-25}      # each launch run: create, the window, up to B_STOP to stop, a count
B_STOP=${B_STOP:-10}
B_COUNT=${B_COUNT:-10}
B_FIXED=$((B_SETUP + B_ENV + B_TESTS + B_ENGINE + B_RESUME))
B_CIFAR=${B_CIFAR:-300}       # part 6, a call of its own (see above)
PARTS=" ${GPU_CHECK_PARTS:-tests engine resume launch cifar} "
for part in $PARTS; do
    case $part in tests|engine|resume|launch|cifar) ;;
        *) echo "GPU_CHECK_PARTS: unknown part '$part' (parts: tests engine resume launch cifar)" >&2; exit 2;; esac
done
want() { [ "${PARTS/ $1 /}" != "$PARTS" ]; }

WORK=$(mktemp -d -t gpu_check.XXXXXX)
SUMMARY=$WORK/summary.txt
: >"$SUMMARY"
LPID=""

finish() {
    # interrupted while a launch ran: stop it (it forwards SIGTERM to its workers)
    if [ -n "$LPID" ] && kill -0 "$LPID" 2>/dev/null; then kill -TERM "$LPID" 2>/dev/null || true; sleep 2; fi
    if [ -n "${GPU_CHECK_OUT:-}" ] && [ -d "${GPU_CHECK_OUT}" ]; then
        cp "$SUMMARY" "$GPU_CHECK_OUT/summary.txt" 2>/dev/null || true
        tar -czf "$GPU_CHECK_OUT/gpu_check_logs.tar.gz" -C "$WORK" --exclude='*.db' --exclude='*-artifacts' . \
            2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap finish EXIT

say() { printf '%s\n' "$*"; }
addsum() { printf '%s\n' "$*" >>"$SUMMARY"; }
header() { say; say "==== [$1] $2 (budget ${3}s, starting at $((SECONDS - START))s) ===="; }
first_dir_with() {  # first_dir_with FILE DIR...: the first DIR that holds FILE (nothing if none does)
    local file=$1 d
    shift
    for d in "$@"; do
        if [ -n "$d" ] && [ -f "$d/$file" ]; then echo "$d"; return; fi
    done
}
not_asked() { say "skipped: $1 is not in GPU_CHECK_PARTS ($PARTS)"; }

PART_RC=0
# run_part LOGNAME BUDGET command...: under timeout, output to the screen and
# to $WORK/LOGNAME.log; PART_RC gets the exit code (124: the budget ran out).
run_part() {
    local log=$WORK/$1.log budget=$2
    shift 2
    set +e
    timeout -k 5 "$budget" "$@" 2>&1 | tee "$log"
    PART_RC=${PIPESTATUS[0]}
    set -e
}
failed() {  # failed WHAT BUDGET: the FAILED line, on the screen and in the summary
    local why="exit code $PART_RC"
    if [ "$PART_RC" -eq 124 ]; then why="exit code 124: its ${2:-}s budget ran out"; fi
    if [ "$PART_RC" -eq 137 ]; then why="exit code 137: killed after its ${2:-}s budget"; fi
    say "FAILED: $1 ($why)"
    addsum "$1: FAILED ($why)"
}

# ---- the python ------------------------------------------------------------------------------
CAND=${PYTHON:-.venv/bin/python}
if command -v "$CAND" >/dev/null 2>&1; then PY=$CAND; else PY=python3; fi
PY_NOTE="$PY"
if [ "$PY" != "$CAND" ]; then PY_NOTE="$PY ($CAND not found)"; fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the project, installed or not

say "gpu_check: repo $REPO, python $PY_NOTE, work dir $WORK"
say "budgets: setup ${B_SETUP}s, environment ${B_ENV}s, gpu tests ${B_TESTS}s, bench_engine ${B_ENGINE}s," \
    "bench_resume ${B_RESUME}s (${B_FIXED}s), then launch 2 x (create ${B_CREATE}s + a 30-60s window + stop" \
    "${B_STOP}s + count ${B_COUNT}s) in what is left of ${LIMIT}s; cifar ${B_CIFAR}s; parts:$PARTS"

# ---- 0. setup: optuna and friends where missing ----------------------------------------------
header 0/6 "setup" "$B_SETUP"
if "$PY" -c "import optuna" 2>/dev/null; then
    say "optuna imports: nothing installed"
    SETUP_NOTE="nothing installed (optuna already there)"
elif ! want tests && ! want engine && ! want resume && ! want launch; then
    say "optuna does not import; only parts that need none are asked for: nothing installed"
    SETUP_NOTE="nothing installed (no part asked for needs optuna)"
else
    MISSING=()
    for pair in optuna:optuna optuna_dashboard:optuna-dashboard typer:typer rich:rich; do
        "$PY" -c "import ${pair%%:*}" 2>/dev/null || MISSING+=("${pair#*:}")
    done
    say "missing: ${MISSING[*]}"
    WHEELS=${WHEELS:-shared/wheels}
    SITE=${CNNSEARCH_SITE:-/tmp/cnnsearch-site}
    SETUP_T0=$SECONDS
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (--no-index --no-deps):"
        ls "$WHEELS"/*.whl | sed 's|.*/|  |'
        run_part setup-wheels $((B_SETUP - 15)) "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
        export PYTHONPATH="$SITE:$PYTHONPATH"
        SETUP_NOTE="installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
    else
        PKGS=()
        for p in "${MISSING[@]}"; do
            if [ "$p" = optuna ]; then PKGS+=("optuna>=4.9,<5.2"); else PKGS+=("$p"); fi  # pyproject's range
        done
        say "no wheels in $WHEELS: pip install ${PKGS[*]} from the package index"
        run_part setup-index $((B_SETUP - 15)) "$PY" -m pip install -q --retries 0 --timeout 10 "${PKGS[@]}"
        SETUP_NOTE="pip install ${PKGS[*]} from the package index"
    fi
    if [ "$PART_RC" -ne 0 ]; then failed "setup: pip install" $((B_SETUP - 15)); SETUP_NOTE="$SETUP_NOTE: FAILED"; fi
    LEFT=$((B_SETUP - (SECONDS - SETUP_T0)))
    if [ "$LEFT" -lt 10 ]; then LEFT=10; fi
    # --no-build-isolation: no index to fetch setuptools from; the machine's own setuptools builds it
    run_part setup-project "$LEFT" "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    if [ "$PART_RC" -eq 0 ]; then
        SETUP_NOTE="$SETUP_NOTE; the project: pip install --no-deps -e ."
    else
        say "pip install --no-deps -e . failed (exit $PART_RC): the project runs from PYTHONPATH=$REPO"
        SETUP_NOTE="$SETUP_NOTE; the project from PYTHONPATH (editable install failed, exit $PART_RC)"
    fi
    "$PY" -c "import optuna" 2>/dev/null || say "optuna still does not import: the parts that need it will fail"
fi
say "setup: $SETUP_NOTE"
addsum "setup: $SETUP_NOTE"

# ---- 1. environment ----------------------------------------------------------------------------
header 1/6 "environment" "$B_ENV"
if command -v nvidia-smi >/dev/null 2>&1; then
    run_part nvidia-smi 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    if [ "$PART_RC" -ne 0 ]; then failed "nvidia-smi" 5; fi
    GPU_LINE=$(sed -n 2p "$WORK/nvidia-smi.log" 2>/dev/null || true)
else
    say "nvidia-smi: not on PATH (no NVIDIA driver here)"
    GPU_LINE="no nvidia-smi"
fi
run_part env $((B_ENV - 5)) "$PY" - <<'EOF'
import importlib, platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
versions = {}
for mod in ("torch", "torchvision", "optuna", "optuna_dashboard", "typer", "rich", "sqlalchemy"):
    try:
        versions[mod] = getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as exc:  # a missing or broken package is a fact to print, not a crash
        versions[mod] = f"missing ({type(exc).__name__})"
    print(f"{mod:17s} {versions[mod]}")
cuda = False
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"torch.cuda.is_available(): {cuda}")
    if cuda:
        p = torch.cuda.get_device_properties(0)
        print(f"device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
              f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}, CUDA {torch.version.cuda}, "
              f"{torch.cuda.device_count()} device(s)")
except Exception as exc:
    print(f"torch.cuda: {type(exc).__name__}: {exc}")
print(f"SUMMARY python {platform.python_version()}, torch {versions['torch']}, torchvision {versions['torchvision']}, "
      f"optuna {versions['optuna']}; torch.cuda.is_available() {cuda}")
EOF
if [ "$PART_RC" -ne 0 ]; then failed "environment" $((B_ENV - 5)); fi
addsum "machine: ${GPU_LINE:-?}; $(grep -h '^SUMMARY ' "$WORK/env.log" | sed 's/^SUMMARY //' || echo 'versions unknown')"

if grep -q '^torch.cuda.is_available(): True' "$WORK/env.log"; then HAVE_CUDA=1; else HAVE_CUDA=0; fi
DEV=${GPU_CHECK_DEVICE:-}
if [ -z "$DEV" ] && [ "$HAVE_CUDA" = 1 ]; then DEV=cuda; fi
NO_DEV_WHY="no CUDA device (torch.cuda.is_available() is not True); GPU_CHECK_DEVICE=cpu runs it on the CPU"

# ---- 2. the gpu-marked tests -----------------------------------------------------------------
if want tests; then
    header 2/6 "pytest -m gpu" "$B_TESTS"
    run_part tests "$B_TESTS" "$PY" -m pytest -q -m gpu -p no:cacheprovider
    TESTS_LINE=$(grep -E '(passed|failed|skipped|deselected|error|no tests ran)' "$WORK/tests.log" | tail -1 \
                 | sed 's/=//g; s/^ *//; s/ *$//' || true)
    if [ "$PART_RC" -ne 0 ]; then
        failed "gpu tests: ${TESTS_LINE:-no result line}" "$B_TESTS"
    else
        note=""
        if [ "$HAVE_CUDA" != 1 ]; then note=" (no CUDA here: they skip)"; fi
        addsum "gpu tests (pytest -m gpu): $TESTS_LINE$note"
    fi
else
    not_asked tests
fi

# ---- 3. bench_engine on the GPU ----------------------------------------------------------------
if want engine; then
    header 3/6 "bench_engine.py --device ${DEV:-cuda} --epochs 3" "$B_ENGINE"
    MNIST=$(first_dir_with MNIST/raw/train-images-idx3-ubyte.gz "${MNIST_DIR:-}" shared/datasets/mnist \
            ../shared/datasets/mnist)
    if [ -z "$DEV" ]; then
        say "skipped: $NO_DEV_WHY"
        addsum "bench_engine: skipped, $NO_DEV_WHY"
    elif [ -z "$MNIST" ]; then
        say "skipped: no MNIST (MNIST/raw/*.gz) in \$MNIST_DIR, shared/datasets/mnist or ../shared/datasets/mnist"
        addsum "bench_engine: skipped, no MNIST found (copy ../shared/datasets/mnist into shared/datasets/)"
    else
        run_part engine "$B_ENGINE" "$PY" scripts/bench_engine.py --device "$DEV" --epochs 3 --data-dir "$MNIST"
        if [ "$PART_RC" -ne 0 ]; then
            failed "bench_engine ($DEV)" "$B_ENGINE"
        else
            # the first (b) line is precision auto (bf16 on a GPU), the second, if any, fp32
            RATIOS=$(grep -o 'speed ratio (b)/(a): [0-9.]*x' "$WORK/engine.log" | sed 's/.*: //; s/x$//' | tr '\n' ' ')
            LATER=$(grep -o 'speed ratio after the first epoch (b)/(a): [0-9.]*x' "$WORK/engine.log" |
                    sed 's/.*: //; s/x$//' | tr '\n' ' ')
            PRECS=$(grep -o '(b) fit, [a-z0-9]* -> [a-z0-9]*' "$WORK/engine.log" | sed 's/(b) fit, //' | tr '\n' ',')
            RATE_A=$(grep -o '^(a) .*samples/s' "$WORK/engine.log" | grep -o '[0-9]* samples/s' || true)
            read -r R1 R2 _ <<<"$RATIOS x x x"
            read -r L1 L2 _ <<<"$LATER x x x"
            P2=$(echo "$PRECS" | cut -d, -f2)
            # the verdict on the steady ratio (after the first epoch), the one a long run sees
            VERDICT=$(awk -v r="$L1" 'BEGIN { print (r + 0 >= 15) ? "met" : "NOT met" }')
            line="bench_engine ($DEV, MNIST, 3 epochs, batch 32): after the first epoch (median of 2 rounds) fit ${PRECS%%,*} ${L1}x"
            line="$line the seed-style loop"
            if [ "$L2" != x ]; then line="$line, $P2 ${L2}x"; fi
            line="$line (all 3 epochs: ${R1}x"
            if [ "$R2" != x ]; then line="$line, ${R2}x"; fi
            EAGER=$(grep -o 'speed ratio after the first epoch (e)/(a): [0-9.]*x' "$WORK/engine.log" | sed 's/.*: //' || true)
            GRAPHS=$(grep -q '^(b) fit, .*CUDA graphs:' "$WORK/engine.log" && echo "CUDA graphs" || echo "eager steps")
            line="$line; seed loop ${RATE_A:-?} over all; $GRAPHS"
            if [ -n "$EAGER" ]; then line="$line, eager steps ${EAGER}"; fi
            line="$line); target >= 15x: $VERDICT"
            say "$line"
            addsum "$line"
        fi
    fi
else
    not_asked engine
fi

# ---- 4. bench_resume on the GPU ----------------------------------------------------------------
if want resume; then
    header 4/6 "bench_resume.py --quick --device ${DEV:-cuda}" "$B_RESUME"
    if [ -z "$DEV" ]; then
        say "skipped: $NO_DEV_WHY"
        addsum "bench_resume: skipped, $NO_DEV_WHY"
    else
        run_part resume "$B_RESUME" "$PY" scripts/bench_resume.py --quick --device "$DEV"
        if [ "$PART_RC" -ne 0 ]; then
            failed "bench_resume ($DEV)" "$B_RESUME"
        else
            addsum "bench_resume --quick ($DEV): $(grep '^resume:' "$WORK/resume.log" | tail -1 | sed 's/^resume: //')"
        fi
    fi
else
    not_asked resume
fi

# ---- 5. launch: 3 workers vs 1 -----------------------------------------------------------------
if want launch; then
    if [ "$DEV" = cuda ] || [ "${DEV#cuda:}" != "$DEV" ]; then
        GPU_ID=0
        if [ "${DEV#cuda:}" != "$DEV" ]; then GPU_ID=${DEV#cuda:}; fi
        WHERE="GPU $GPU_ID"
    else
        WHERE="CPU, $(nproc) cores"
    fi
    if [ -z "${LAUNCH_WINDOW:-}" ]; then
        LAUNCH_WINDOW=$(((LIMIT - (SECONDS - START) - 2 * (B_CREATE + B_STOP + B_COUNT)) / 2))
        if [ "$LAUNCH_WINDOW" -gt 60 ]; then LAUNCH_WINDOW=60; fi
        if [ "$LAUNCH_WINDOW" -lt 30 ]; then LAUNCH_WINDOW=30; fi
    fi
    B_LAUNCH_EACH=$((B_CREATE + LAUNCH_WINDOW + B_STOP + B_COUNT))
    header 5/6 "cnnsearch launch digits_quick, 1 vs 3 workers on $WHERE, ${LAUNCH_WINDOW}s window each" \
        "$((2 * B_LAUNCH_EACH))"
    if [ "$WHERE" = "${WHERE#GPU}" ]; then
        say "no CUDA: the CPU analogue (--cpus 1 vs --cpus 3), to exercise the steps; not a GPU figure"
    fi

    # flush left: python -c refuses an indented first line
    COUNT_PY='
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="digits_quick", storage=sys.argv[1])
S = optuna.trial.TrialState
trials = study.get_trials(deepcopy=False)
done = [t for t in trials if t.state in (S.COMPLETE, S.PRUNED)]
if not done:
    print("COUNT", 0, 0, 0, 0, "-", "-")
    sys.exit()
# steady state: from the first trial start to the last finish (workers start up before that)
span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in trials if t.datetime_start)).total_seconds()
devices = ",".join(sorted({str(t.user_attrs.get("device")) for t in done}))
precisions = ",".join(sorted({str(t.user_attrs.get("precision")) for t in done}))
print("COUNT", len(done), sum(t.state == S.PRUNED for t in done), f"{span:.1f}", f"{len(done) * 3600 / max(span, 1e-9):.0f}",
      devices, precisions)
'
    is_worker() { { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null | grep -q 'search.cli worker digits_quick'; }
    declare -A RATE
    for n in 1 3; do
        if [ "$WHERE" = "${WHERE#GPU}" ]; then SLOTS=(--cpus "$n"); LABEL="--cpus $n"; else
            SLOTS=(--gpus "$GPU_ID" --per-gpu "$n"); LABEL="--per-gpu $n"; fi
        URL="sqlite:///$WORK/launch$n.db"
        say "-- $LABEL: create (budget ${B_CREATE}s), launch for ${LAUNCH_WINDOW}s, then SIGTERM (forwarded to the workers)"
        run_part create$n "$B_CREATE" "$PY" -m search.cli create studies/digits_quick.toml --storage "$URL" \
            --set study.n_trials=100000 --set study.timeout=86400
        if [ "$PART_RC" -ne 0 ]; then failed "launch $LABEL: create" "$B_CREATE"; continue; fi
        T_LAUNCH=$SECONDS
        # Not under `timeout`: that signals the process group as well as launch, and a background job
        # of a script starts with SIGINT ignored. One SIGTERM to launch, which forwards it to its workers.
        "$PY" -m search.cli launch digits_quick --storage "$URL" "${SLOTS[@]}" --log-dir "$WORK/logs$n" \
            >"$WORK/launch$n.log" 2>&1 &
        LPID=$!
        while [ $((SECONDS - T_LAUNCH)) -lt "$LAUNCH_WINDOW" ] && kill -0 "$LPID" 2>/dev/null; do sleep 1; done
        STOPPED_BY_US=0
        if kill -0 "$LPID" 2>/dev/null; then kill -TERM "$LPID" 2>/dev/null || true; STOPPED_BY_US=1; fi
        T_STOP=$SECONDS
        while kill -0 "$LPID" 2>/dev/null && [ $((SECONDS - T_STOP)) -lt "$B_STOP" ]; do sleep 1; done
        if kill -0 "$LPID" 2>/dev/null; then say "launch did not stop in ${B_STOP}s: SIGKILL"; kill -KILL "$LPID" 2>/dev/null || true; fi
        set +e
        wait "$LPID"
        PART_RC=$?
        set -e
        cat "$WORK/launch$n.log"
        # launch exits 1 when its workers were stopped by the signal: expected here
        if [ "$STOPPED_BY_US" = 1 ] && [ "$PART_RC" -ne 137 ]; then LAUNCH_RC=0; else LAUNCH_RC=$PART_RC; fi
        LPID=""
        # workers run in their own sessions: one that outlived launch (SIGKILLed) is stopped by its pid,
        # once /proc says that pid is still that worker
        for pid in $(grep -o '(pid [0-9]*' "$WORK/launch$n.log" | grep -o '[0-9]*'); do
            if is_worker "$pid"; then
                say "worker pid $pid outlived launch: SIGTERM, then SIGKILL"
                kill -TERM "$pid" 2>/dev/null || true
                sleep 3
                if is_worker "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
            fi
        done
        if [ "$LAUNCH_RC" -ne 0 ]; then
            failed "launch $LABEL" "$LAUNCH_WINDOW"
            tail -n 5 "$WORK"/logs$n/*.log 2>/dev/null || true
            continue
        fi
        run_part count$n "$B_COUNT" "$PY" -c "$COUNT_PY" "$URL"
        if [ "$PART_RC" -ne 0 ]; then failed "launch $LABEL: counting trials" "$B_COUNT"; continue; fi
        read -r _ DONE PRUNED SPAN R DEVS PRECS <<<"$(grep '^COUNT ' "$WORK/count$n.log" | tail -1)"
        RATE[$n]=$R
        line="launch $LABEL on $WHERE (digits_quick, ${LAUNCH_WINDOW}s window): $DONE trials ($PRUNED pruned) in ${SPAN}s of trials -> $R trials/h (device $DEVS, $PRECS)"
        say "$line (wall $((SECONDS - T_LAUNCH))s)"
        addsum "$line"
    done
    if [ -n "${RATE[1]:-}" ] && [ -n "${RATE[3]:-}" ] && [ "${RATE[1]}" != 0 ]; then
        addsum "launch 3 vs 1 workers on $WHERE: $(awk -v a="${RATE[3]}" -v b="${RATE[1]}" 'BEGIN { printf "%.2f", a / b }')x the trials per hour"
    else
        addsum "launch 3 vs 1 workers on $WHERE: no ratio (a run above failed or finished no trial in its window)"
    fi
else
    not_asked launch
fi

# ---- 6. the CIFAR final training ---------------------------------------------------------------
if want cifar; then
    header 6/6 "CIFAR final training, scripts/gpu_check_cifar.toml, ${CIFAR_EPOCHS:-30} epochs on ${DEV:-cuda}" \
        "$B_CIFAR"
    CIFAR_ROOT=$(first_dir_with cifar10-jpeg/cifar10-jpeg.zip "${CIFAR_DIR:-}" shared/datasets ../shared/datasets)
    if [ -z "$DEV" ]; then
        say "skipped: $NO_DEV_WHY"
        addsum "cifar final training: skipped, $NO_DEV_WHY"
    elif [ -z "$CIFAR_ROOT" ]; then
        say "skipped: no cifar10-jpeg/cifar10-jpeg.zip in \$CIFAR_DIR, shared/datasets or ../shared/datasets"
        addsum "cifar final training: skipped, no CIFAR-10 (JPEG q75 copy) found (a call of its own, see the header)"
    else
        EPOCHS=${CIFAR_EPOCHS:-30}
        SUBSET=()
        if [ -n "${CIFAR_SUBSET:-}" ]; then SUBSET=(--set "subset=$CIFAR_SUBSET"); fi
        for kv in ${CIFAR_SET:-}; do SUBSET+=(--set "$kv"); done
        T_CIFAR=$SECONDS
        run_part cifar "$B_CIFAR" "$PY" -m search.cli train scripts/gpu_check_cifar.toml --device "$DEV" \
            --epochs "$EPOCHS" --data-dir "$CIFAR_ROOT" --seeds 1 --checkpoint-every 0 -o "$WORK/cifar" "${SUBSET[@]}"
        WALL=$((SECONDS - T_CIFAR))
        if [ "$PART_RC" -ne 0 ]; then
            failed "cifar final training ($DEV, $EPOCHS epochs)" "$B_CIFAR"
        else
            # epoch lines end "  12.3s (3652 img/s)": the median epoch (the first one includes warm-up)
            grep -E '^epoch +[0-9]+/' "$WORK/cifar.log" | sed -E 's/.* ([0-9.]+)s \([0-9]+ img\/s\)$/\1/' \
                >"$WORK/cifar_epoch_s.txt" || true
            DONE=$(wc -l <"$WORK/cifar_epoch_s.txt")
            FIRST=$(head -1 "$WORK/cifar_epoch_s.txt")
            MED=$(sort -n "$WORK/cifar_epoch_s.txt" | awk '{ t[NR] = $1 } END {
                if (NR) printf "%.1f", NR % 2 ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2 }')
            TEST=$(grep -o '^test acc [0-9.]*%' "$WORK/cifar.log" | tail -1 | sed 's/^test acc //')
            TRAINED=$(grep -o '^data: [0-9,]* training images' "$WORK/cifar.log" | grep -o '[0-9,]*' | head -1)
            PROJ=$(awk -v m="$MED" 'BEGIN { printf "%.0f", 100 * m }')
            VERDICT=$(awk -v t="${TEST%\%}" -v e="$EPOCHS" \
                'BEGIN { print (t + 0 >= 93) ? "met" : "not met at " e " epochs" }')
            line="cifar final training ($DEV, CIFAR-10 (JPEG q75 copy), six-conv width 2, $DONE epochs on ${TRAINED:-?} images"
            if [ -n "${CIFAR_SET:-}" ]; then line="$line, --set ${CIFAR_SET}"; fi
            STEPS=$(grep -q 'CUDA graphs)' "$WORK/cifar.log" && echo "CUDA graphs" || echo "eager steps")
            line="$line, $STEPS):"
            line="$line test ${TEST:-?}, wall ${WALL}s (data, model and test included), ${MED}s an epoch (median;"
            line="$line first ${FIRST}s) -> 100 epochs ~${PROJ}s; >= 93%: $VERDICT"
            say "$line"
            addsum "$line"
        fi
    fi
else
    not_asked cifar
fi

# ---- summary -------------------------------------------------------------------------------------
addsum "wall time: $((SECONDS - START))s (budgets: ${B_FIXED}s + launch $((2 * ${B_LAUNCH_EACH:-0}))s + cifar ${B_CIFAR}s)"
say
say "==== summary (one figure a line, for docs/results.md) ===="
cat "$SUMMARY"
exit 0
