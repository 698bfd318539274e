"""CI runs the C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer: this test runs
scripts/sanitize.sh (a CMake build of csrc/ with -fsanitize=address,undefined into build/asan,
then the C++ backend's tests against it, see the script) and fails on any finding, with the
tail of its output. It needs cmake, gcc and gcc's libasan/libubsan; a missing tool fails with
a clear message (it is not skipped). Takes a few minutes (about 2 for the build on 2 cores)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1800


def _tail(text: str, n: int = 80) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.mark.slow
def test_cpu_kernels_under_asan_and_ubsan():
    if os.environ.get("ATTNKERN_EXTENSION_DIR"):
        pytest.skip("already running inside the sanitizer build (scripts/sanitize.sh)")
    for tool in ("cmake", "gcc", "bash"):
        if shutil.which(tool) is None:
            pytest.fail(f"the sanitizer build needs {tool} on PATH (cmake: `pip install cmake` or the "
                        f"system package)")
    for lib in ("libasan.so", "libubsan.so"):
        path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            pytest.fail(f"gcc has no {lib} (got {path!r}): install gcc's sanitizer runtimes")
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNKERN_BACKEND", "PYTEST_ADDOPTS")}
    env["PY"] = sys.executable
    try:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "sanitize.sh")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"scripts/sanitize.sh ran past {TIMEOUT_S} s; last output:\n{_tail(out)}")
    out = proc.stdout + "\n" + proc.stderr
    assert proc.returncode == 0, f"scripts/sanitize.sh exited {proc.returncode}:\n{_tail(out)}"
    assert " passed" in proc.stdout, f"the sanitized tests did not run:\n{_tail(out)}"
    for finding in ("ERROR: AddressSanitizer", "runtime error:"):
        assert finding not in out, f"sanitizer finding:\n{_tail(out)}"
