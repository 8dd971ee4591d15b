#!/usr/bin/env bash
# One-call GPU check for facefind (docs/GPU.md). Two phases:
#   scripts/gpu_check.sh prepare                 # here, with the package registry: .gpu-wheels/ + .gpu-data/
#   scripts/gpu_check.sh run --device cuda --out DIR   # there, offline: tests, benchmarks, accuracy, report
#   scripts/gpu_check.sh run --device cpu --small --no-install   # the CPU dry run
# The work is done by scripts/gpu_check.py (standard library only); this picks the Python to run it:
# $PYTHON if set, else the checkout's .venv (prepare), else python3 / python on PATH (the GPU machine).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"
    elif command -v python3 >/dev/null; then py=python3
    elif command -v python >/dev/null; then py=python
    else echo "gpu_check: no python3 on PATH: set PYTHON=/path/to/python" >&2; exit 2
    fi
fi
exec "$py" "$here/gpu_check.py" "$@"
