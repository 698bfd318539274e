"""SE: fused (attnkern) vs naive (the reference) vs timm eager vs torch.compile(timm).

Memory floor: forward 2 reads + 1 write; backward 2 reads (pass A) + 2 reads + 1 write (pass C).

``pytest --benchmark benchmarks/test_bench_se.py``; ``python benchmarks/report.py`` writes RESULTS.md.
"""
from __future__ import annotations

import pytest

from attnkern.compare import make_variant
from gating_bench import SHAPE_IDS, SHAPES, copy_bandwidth, forward, forward_backward, saved_bytes

OP = "se"
VARIANTS = ["fused", "naive", "timm", "compile"]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_copy_bandwidth(benchmark, recorder, shape):
    copy_bandwidth(benchmark, recorder, OP, shape, {"fwd": 3, "fwd+bwd": 8})


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward(benchmark, recorder, shape, variant):
    forward(benchmark, recorder, OP, variant, make_variant(OP, variant, shape[1], train=False), shape)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_backward(benchmark, recorder, shape, variant):
    forward_backward(benchmark, recorder, OP, variant, make_variant(OP, variant, shape[1], train=True), shape)


@pytest.mark.parametrize("variant", ["fused", "naive", "timm"])
def test_saved_for_backward_bytes(recorder, variant):
    saved_bytes(recorder, OP, variant, make_variant(OP, variant, SHAPES[0][1], train=True), SHAPES[0])
