#!/usr/bin/env bash
# The device check's CPU smoke (`make gpu-smoke`): bench/gpu/run.sh end to end on the tiny preset,
# in a fresh Python 3.12 venv holding only torch and transformers (pyproject's pins) before
# run.sh installs the carried wheels from .whl/ without an index, as on the device machine. Then
# bench/run_all.py writes its gpu section from the output (into build/gpu-smoke/, not bench/).
#
#     make gpu-smoke                      # SMOKE_PYTHON=/path/to/python3.12 to choose the interpreter
#
# On 3.12 PyPI's torch wheel is the CUDA build (this machine's CPU wheel is cp311 only): the first
# venv downloads a few GB, later ones come from pip's cache. It runs on the CPU all the same.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
SMOKE=build/gpu-smoke
find_python() {
    for candidate in "${SMOKE_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    echo "gpu-smoke: no Python 3.12 found (the carried wheels are cp312); set SMOKE_PYTHON" >&2
    exit 2
}
PY312=$(find_python)
[ -f .whl/requirements.txt ] || bash bench/gpu/fetch_wheels.sh
pin() { "$PY312" -c "import re, sys, tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if re.match(sys.argv[1] + '[=<> ]', d)))" "$1"; }

rm -rf "$SMOKE" && mkdir -p "$SMOKE"
"$PY312" -m venv "$SMOKE/venv"
"$SMOKE/venv/bin/pip" install -q "$(pin torch)"
"$SMOKE/venv/bin/pip" install -q -c constraints.txt "$(pin transformers)"
PYTHON="$SMOKE/venv/bin/python" bash bench/gpu/run.sh "$SMOKE/gpu_results.jsonl" --cpu-smoke --budget-s 300
"${PYTHON:-.venv/bin/python}" bench/run_all.py --gpu-results "$SMOKE/gpu_results.jsonl" --out "$SMOKE/RESULTS.md"
