"""Fixtures of the benchmark suites: timing through pytest-benchmark, and one CSV row per
figure in ``benchmarks/results.csv`` (op, variant, pass, shape, dtype, metric, median, p20,
p80, device, version, date), which ``benchmarks/report.py`` turns into RESULTS.md and plots.

Ratios are only meaningful between rows of the same run: every row carries the run's id.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import statistics
import sys
import uuid

import pytest
import torch

import attnkern

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gating_bench, shared by suites

CSV_PATH = os.environ.get(
    "ATTNKERN_BENCH_CSV", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.csv")
)
COLUMNS = ["run", "op", "variant", "pass", "shape", "dtype", "metric", "median", "p20", "p80",
           "device", "version", "date"]
RUN_ID = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    from attnkern._cpu import cpu_model

    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Recorder:
    def __init__(self, path: str):
        self.path = path

    def row(self, op, variant, pass_, shape, dtype, metric, median, p20=None, p80=None, device="cpu"):
        """Append one figure. ``shape`` is a tuple or string; ``dtype`` a torch dtype or string."""
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(COLUMNS)
            w.writerow([
                RUN_ID, op, variant, pass_,
                "x".join(map(str, shape)) if isinstance(shape, (tuple, list)) else str(shape),
                str(dtype).replace("torch.", ""), metric,
                f"{median:.6g}", "" if p20 is None else f"{p20:.6g}", "" if p80 is None else f"{p80:.6g}",
                device_name(device), f"attnkern {attnkern.__version__} / torch {torch.__version__}",
                _dt.date.today().isoformat(),
            ])

    def time(self, benchmark, fn, *, op, variant, pass_, shape, dtype, rounds=7, warmup=2, device="cpu"):
        """Time ``fn`` with pytest-benchmark (``rounds`` rounds of one call after ``warmup``)
        and record median/p20/p80 in milliseconds. Returns the median in seconds."""
        if device.startswith("cuda"):
            def timed():
                fn()
                torch.cuda.synchronize()
        else:
            timed = fn
        benchmark.extra_info.update(op=op, variant=variant, pass_=pass_, shape=str(shape), dtype=str(dtype))
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
        data = list(benchmark.stats.stats.data)
        med = statistics.median(data)
        self.row(op, variant, pass_, shape, dtype, "time_ms", med * 1e3,
                 _quantile(data, 0.2) * 1e3, _quantile(data, 0.8) * 1e3, device=device)
        return med


@pytest.fixture(scope="session")
def recorder() -> Recorder:
    return Recorder(CSV_PATH)
