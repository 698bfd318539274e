#!/usr/bin/env bash
# Build the C++ kernels with AddressSanitizer + UndefinedBehaviorSanitizer (CMakeLists.txt) and
# run the tests that exercise the C++ backend against that build: the primitives (tests/cpu),
# the torch.library registration, the direct convolutions (spatial_conv, dilated_conv), the
# CBAM/SE/BAM block tests, the property tests, the
# NaN/Inf tests and the thread tests forced onto the cpu backend. Any finding fails the run.
# Works from a fresh clone (build/asan is created); tests/cpu/test_sanitizers.py runs it in CI.
#   scripts/sanitize.sh [PYTEST ARGS...]       (extra arguments go to pytest, e.g. -x)
# Environment: PY (the Python of the venv, default .venv/bin/python), MAX_JOBS (build jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac
[ -x "$PY" ] || { echo "sanitize.sh: no Python at $PY (set PY)" >&2; exit 2; }
command -v cmake >/dev/null || { echo "sanitize.sh: cmake not found (pip install cmake, or apt-get install cmake)" >&2; exit 2; }
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
for lib in "$asan" "$ubsan"; do
    [ -e "$lib" ] || { echo "sanitize.sh: gcc has no sanitizer runtime ($lib); install libasan/libubsan (gcc's)" >&2; exit 2; }
done
echo "[sanitize] building build/asan" >&2
cmake -S . -B build/asan -DATTNKERN_SANITIZE=ON -DPython3_EXECUTABLE="$PY" >/dev/null
cmake --build build/asan -j"${MAX_JOBS:-2}" >/dev/null
export LD_PRELOAD="$asan $ubsan"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export ATTNKERN_EXTENSION_DIR=build/asan ATTNKERN_BACKEND=cpu
# the sanitized module must be the one that loads
"$PY" -c "from attnkern import _cpu; import os; _cpu.require(); p = _cpu.library_path(); assert os.path.realpath(p).startswith(os.path.realpath('build/asan')), p"
echo "[sanitize] running the C++ backend's tests" >&2
# -k: the block tests' triton cases and torch.compile cases do not run the C++ kernels
# differently (inductor would also compile its own C++ under the preloaded sanitizers); the
# disassembly check of the ISA copies reads the normal build's instructions, not this one's.
exec "$PY" -m pytest -q -p no:cacheprovider -m "not bigmem" --ignore=tests/cpu/test_sanitizers.py \
    tests/cpu tests/ops/test_gating.py tests/ops/test_cbam.py tests/ops/test_se.py tests/ops/test_bam.py \
    tests/ops/test_special_values.py tests/ops/test_threads.py tests/ops/test_spatial_conv.py \
    tests/ops/test_dilated_conv.py \
    tests/ops/test_fuzz.py::test_cbam_cpu tests/ops/test_fuzz.py::test_se_cpu tests/ops/test_fuzz.py::test_bam_cpu \
    -k "not triton and not compile and not no_instruction_wider_than_its_copy" "$@"
