#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): tests, kernel bandwidth, attention TFLOP/s and the
# profile job on one CUDA GPU in at most 8 minutes; writes benchmarks/RESULTS-gpu.md.
# `scripts/gpu_check.sh --dry-run` runs the same script on the CPU with tiny shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" scripts/gpu_check.py "$@"
