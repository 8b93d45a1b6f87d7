#!/usr/bin/env bash
# Proves the project on a GPU machine and writes one markdown report:
#
#   bash scripts/gpu_check.sh REPORT.md             # a GPU machine: under 8 minutes on one GPU
#   bash scripts/gpu_check.sh --dry-run REPORT.md   # a CPU: every step that can run there, in minutes
#
# Options:
#   --python PY      use this interpreter as it is (also $PYTHON): no venv, no pip install
#   --original PATH  repository of the original implementation, benchmarked too (also $DVT_ORIGINAL)
#   --wheels DIR     install requirements.txt from these wheels only (a machine without network)
#   --budget-s S     seconds for the whole run (default 470; dry run 180)
#   --logs FILE      also write every step's log and the junit file to this .tar.gz
#
# Steps, each under a time limit of its own (`timeout`), every outcome in the report:
#   1. setup: a venv that also sees the machine's own packages (its CUDA build of torch), then
#      pip install -q -r requirements.txt with the machine's pip; when that fails the report says
#      so and the run goes on with what the machine has;
#   2. machine: GPU, driver (nvidia-smi), torch, CUDA, cuDNN, NCCL, timm, the CPU and its capability;
#   3. tests: python -m pytest -m cuda, each test's result from --junitxml (from the -v log when
#      the time limit stopped the run);
#   4. benchmark: scripts/bench_gpu.py bench with the time left (sections it cannot reach are
#      reported as skipped);
#   5. the report.
# Exit status: 0 when every step but the venv and the pip install succeeded (the cuda tests passed
# or were skipped), else 1; the report is written either way.
set -u -o pipefail

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

DRY_RUN=0
PY="${PYTHON:-}"
ORIGINAL="${DVT_ORIGINAL:-}"
WHEELS=""
BUDGET=""
LOGS=""
REPORT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --python) PY="${2:?--python needs an interpreter}"; shift ;;
        --original) ORIGINAL="${2:?--original needs a path}"; shift ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
        --budget-s) BUDGET="${2:?--budget-s needs seconds}"; shift ;;
        --logs) LOGS="${2:?--logs needs a file name}"; shift ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) [ -z "$REPORT" ] || usage; REPORT="$1" ;;
    esac
    shift
done
[ -n "$REPORT" ] || usage
case "$REPORT" in /*) ;; *) REPORT="$PWD/$REPORT" ;; esac
case "$LOGS" in /*|"") ;; *) LOGS="$PWD/$LOGS" ;; esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
START=$SECONDS
if [ "$DRY_RUN" = 1 ]; then
    BUDGET="${BUDGET:-180}"; TESTS_CAP=90; BENCH_MIN=60; MODE="dry run on the CPU"
else
    BUDGET="${BUDGET:-470}"; TESTS_CAP=240; BENCH_MIN=150; MODE="GPU run"
fi

left() { echo $(( BUDGET - (SECONDS - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
say() { echo "[gpu_check $(( SECONDS - START ))s] $*"; }

STEPS=()  # "| step | result | seconds |" rows
STATUS=0
# step NAME LIMIT CMD...: run CMD under `timeout`, its output in $WORK/NAME.log; returns its status.
step() {
    local name="$1" limit="$2" began=$SECONDS rc result
    shift 2
    if [ "$limit" -lt 5 ]; then
        STEPS+=("| $name | skipped (time) | 0 |")
        STATUS=1
        say "$name: skipped (time)"
        return 124
    fi
    say "$name (at most ${limit}s)"
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) result="ok" ;;
        124|137) result="stopped at its time limit (${limit}s)" ;;
        *) result="failed (exit status $rc)" ;;
    esac
    STEPS+=("| $name | $result | $(( SECONDS - began )) |")
    case "$name:$rc" in venv:*|pip:*|*:0) ;; *) STATUS=1 ;; esac
    say "$name: $result"
    return $rc
}

log_tail() {  # the end of a step's log, as a code block
    echo '```'
    tail -n "${2:-15}" "$WORK/$1.log" 2>/dev/null
    echo '```'
}

# ---------------------------------------------------------------------------- 1. setup
SETUP=()
if [ -n "$PY" ]; then
    SETUP+=("- interpreter given: \`$PY\`; no venv, no pip install")
else
    BASE="$(command -v python3 || command -v python)"
    if [ -z "$BASE" ]; then
        echo "no python3 on this machine" >&2
        exit 1
    fi
    VENV="$WORK/venv"
    # No pip of its own (nor an old bundled setuptools): the machine's pip installs into it.
    if step venv 120 "$BASE" -m venv --system-site-packages --without-pip "$VENV"; then
        # The machine's packages may sit in a venv of their own, which --system-site-packages does
        # not reach: a .pth file puts the base interpreter's site-packages after the new venv's.
        PURELIB="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        "$BASE" -c 'import site; print("\n".join(site.getsitepackages()))' >"$PURELIB/machine-packages.pth"
        PY="$VENV/bin/python"
        SETUP+=("- venv: \`$VENV\` (with the packages of \`$BASE\` behind its own)")
    else
        PY="$BASE"
        SETUP+=("- venv: could not be made; running with \`$BASE\` and the packages it has")
    fi
    PIP=(-q --disable-pip-version-check --retries 1 --timeout 15 -r requirements.txt)
    [ -n "$WHEELS" ] && PIP+=(--no-index --find-links "$WHEELS")
    if step pip "$(min 240 "$(left)")" "$PY" -m pip install "${PIP[@]}"; then
        SETUP+=("- \`pip install ${PIP[*]}\`: ok")
    else
        SETUP+=("- \`pip install ${PIP[*]}\`: failed; the run goes on with the packages already there. The end of its output:" "$(log_tail pip 12)")
    fi
fi

# -------------------------------------------------------------------------- 2. machine
step machine 120 "$PY" scripts/bench_gpu.py machine --out "$WORK/machine.md"

# ---------------------------------------------------------------------------- 3. tests
PYTEST=(-m pytest -m cuda -p no:cacheprovider -p no:randomly)  # in file order: the slowest test is last
step collect 90 "$PY" "${PYTEST[@]}" --collect-only -q
cp "$WORK/collect.log" "$WORK/collected.txt" 2>/dev/null
# A test module that cannot be imported here (a package this machine lacks) is reported as an
# error and the other modules' cuda tests still run.
step tests "$(min "$TESTS_CAP" $(( $(left) - BENCH_MIN )))" "$PY" "${PYTEST[@]}" -v --junitxml "$WORK/cuda.xml" \
    --continue-on-collection-errors
step test-table 60 "$PY" scripts/bench_gpu.py tests --junit "$WORK/cuda.xml" --log "$WORK/tests.log" \
    --collected "$WORK/collected.txt" --out "$WORK/tests.md"

# ------------------------------------------------------------------------ 4. benchmark
BENCH=(scripts/bench_gpu.py bench --out "$WORK/bench.md")
[ "$DRY_RUN" = 1 ] && BENCH+=(--dry-run --threads 1)
[ -n "$ORIGINAL" ] && BENCH+=(--original "$ORIGINAL")
BENCH_LIMIT=$(( $(left) - 15 ))
step bench "$BENCH_LIMIT" "$PY" "${BENCH[@]}" --budget-s $(( BENCH_LIMIT > 30 ? BENCH_LIMIT - 20 : 10 ))

# --------------------------------------------------------------------------- 5. report
part() {  # a step's markdown, or why there is none
    if [ -s "$WORK/$1.md" ]; then
        cat "$WORK/$1.md"
    else
        echo "not available: the step did not write it. The end of its output:"
        log_tail "$2"
    fi
}

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo "unknown")"
[ -n "$(git status --porcelain 2>/dev/null)" ] && COMMIT="$COMMIT (with local changes)"
{
    echo "# GPU check: $MODE"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'); commit $COMMIT; $(( SECONDS - START )) s of the ${BUDGET} s budget;"
    echo "logs in \`$WORK\`${LOGS:+ and \`$LOGS\`}"
    echo
    echo "| step | result | s |"
    echo "|---|---|---:|"
    printf '%s\n' "${STEPS[@]}"
    echo
    echo "## Setup"
    echo
    printf '%s\n' "${SETUP[@]}"
    echo
    echo "## Machine"
    echo
    part machine machine
    echo
    echo "## CUDA tests (\`python -m pytest -m cuda\`)"
    echo
    part tests tests
    echo
    echo "## Benchmark (\`scripts/bench_gpu.py bench\`)"
    echo
    part bench bench
    if [ "$DRY_RUN" = 1 ]; then
        echo "## What this dry run leaves to a GPU"
        echo
        echo "- every \`cuda\` test above (skipped here: they need a CUDA device);"
        echo "- the benchmark as planned for a GPU (see \"Left to a GPU\" above);"
        [ -z "${VENV:-}" ] && echo "- the venv and the pip install (an interpreter was given);"
        echo "- the time limits of a GPU run: 240 s for the tests and 470 s in all (here ${TESTS_CAP} s and ${BUDGET} s)."
    fi
} >"$REPORT"
[ -n "$LOGS" ] && tar -czf "$LOGS" -C "$WORK" --exclude venv .
say "report: $REPORT"
exit "$STATUS"
