"""CBAM, SE and BAM: fused (attnkern) vs naive (the reference) vs the eager module users have
(timm; for BAM the reference is that module) vs torch.compile of it, side by side in one run.

``pytest --benchmark benchmarks/test_bench_blocks.py -k cbam``; ``python benchmarks/report.py``
writes RESULTS.md. Memory floors (reads + writes of x's size, attnkern.compare.FLOOR_TRANSFERS):
CBAM forward 3R+1W, backward 4R+1W (the fused backward does 5R+1W: spatial_stats_backward
needs the spatial branch's gradient, which needs gate_apply_backward's); SE and BAM forward 2R+1W, backward
2R (pass A) + 2R+1W (dx). BAM's spatial convs stay PyTorch's in every variant.
"""
from __future__ import annotations

import pytest

from attnkern.compare import FLOOR_TRANSFERS, OPS, VARIANTS, make_variant
from gating_bench import SHAPE_IDS, SHAPES, copy_bandwidth, forward, forward_backward, saved_bytes

CASES = [(op, v) for op in OPS for v in VARIANTS[op]]
CASE_IDS = [f"{op}-{v}" for op, v in CASES]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_copy_bandwidth(benchmark, recorder, shape, op):
    fw, bw = FLOOR_TRANSFERS[op]
    copy_bandwidth(benchmark, recorder, op, shape, {"fwd": fw, "fwd+bwd": fw + bw})


@pytest.mark.parametrize("op,variant", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward(benchmark, recorder, shape, op, variant):
    forward(benchmark, recorder, op, variant, make_variant(op, variant, shape[1], train=False), shape)


@pytest.mark.parametrize("op,variant", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_backward(benchmark, recorder, shape, op, variant):
    forward_backward(benchmark, recorder, op, variant, make_variant(op, variant, shape[1], train=True), shape)


@pytest.mark.parametrize("op,variant", [c for c in CASES if c[1] != "compile"],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[1] != "compile"])
def test_saved_for_backward_bytes(recorder, op, variant):
    saved_bytes(recorder, op, variant, make_variant(op, variant, SHAPES[0][1], train=True), SHAPES[0])
