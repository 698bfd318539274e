#!/usr/bin/env bash
# Build the C++ kernels with AddressSanitizer + UndefinedBehaviorSanitizer (CMakeLists.txt) and
# run the C++ backend's tests against that build. Any finding fails the run.
#   scripts/sanitize.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
cmake -S . -B build/asan -DATTNKERN_SANITIZE=ON -DPython3_EXECUTABLE="$PWD/$PY" >/dev/null
cmake --build build/asan -j"${MAX_JOBS:-2}" >/dev/null
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan $ubsan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export ATTNKERN_EXTENSION_DIR=build/asan ATTNKERN_BACKEND=cpu
"$PY" -m pytest -q -p no:cacheprovider tests/cpu "$@"
