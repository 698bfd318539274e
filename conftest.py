"""Session-wide pytest setup for attnkern's tests and benchmarks.

- Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors; the variable
  must be set before triton is first imported, so it is set here.
- ``attnkern profile`` runs called from the tests leave the test process's malloc as it is
  (``ATTNKERN_ALLOCATOR=off``); tests/slides/test_allocator.py checks the default policy in a
  process of its own.
- ``pytest`` runs the tests; ``pytest --benchmark`` runs the benchmark suites in benchmarks/
  (they are not collected otherwise).
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
import tests._triton_interpreter  # noqa: E402,F401  (bf16 casts round to nearest even, as on a GPU)

os.environ.setdefault("ATTNKERN_ALLOCATOR", "off")

_BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the benchmark suites in benchmarks/ (fused vs naive vs torch.compile)",
    )


def pytest_ignore_collect(collection_path, config):
    p = str(collection_path)
    if not config.getoption("--benchmark") and (p == _BENCH_DIR or p.startswith(_BENCH_DIR + os.sep)):
        return True
    return None
