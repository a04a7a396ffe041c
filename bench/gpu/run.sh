#!/usr/bin/env bash
# The device check in one command: install the carried wheels without an index, then run
# bench/gpu/check.py, its JSON lines on the console and in the results file.
#
#     bash bench/gpu/run.sh [RESULTS_FILE] [check.py flags]     # default file: $OUT/gpu_results.jsonl
#     PYTHON=venv/bin/python bash bench/gpu/run.sh out.jsonl --cpu-smoke
#
# See bench/gpu/README.md (what it measures, how to carry .whl/, the time it takes).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$ROOT/.whl}
RESULTS=${OUT:-.}/gpu_results.jsonl
if [ $# -gt 0 ] && [[ $1 != --* ]]; then RESULTS=$1; shift; fi
RESULTS=$(realpath -m "$RESULTS")  # the check runs from the repository root

if [ ! -f "$WHEELS/requirements.txt" ]; then
    echo "run.sh: $WHEELS/requirements.txt is missing: run bench/gpu/fetch_wheels.sh (and carry .whl)" >&2
    exit 2
fi
if ! "$PYTHON" -c "import lzma" 2>/dev/null; then
    echo "run.sh: $PYTHON has no lzma module: pip cannot read the LZMA-repacked wheels (fetch_wheels.sh)" >&2
    exit 2
fi
started=$(date +%s)
"$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
echo "[gpu-check] wheels installed in $(($(date +%s) - started)) s" >&2
mkdir -p "$(dirname "$RESULTS")"
cd "$ROOT"
PYTHONPATH="$ROOT" "$PYTHON" bench/gpu/check.py "$@" | tee "$RESULTS"
echo "[gpu-check] $(grep -c '^{' "$RESULTS") records in $RESULTS, $(($(date +%s) - started)) s in all" >&2
