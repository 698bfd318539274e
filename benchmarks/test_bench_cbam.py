"""CBAM: fused (attnkern) vs naive (the reference) vs timm eager vs torch.compile(timm).

``pytest --benchmark benchmarks/test_bench_cbam.py``; ``python benchmarks/report.py`` writes
RESULTS.md. Memory floor: forward 3 reads + 1 write of x's size; forward+backward adds
DESIGN.md's 4 reads + 1 write for backward (the fused backward does 5 reads + 1 write: pass B
needs the spatial branch's gradient, which needs pass A's).
"""
from __future__ import annotations

import pytest
import torch
from timm.layers.cbam import CbamModule

from attnkern.nn import CBAM
from attnkern.reference import cbam as ref
from gating_bench import SHAPE_IDS, SHAPES, copy_bandwidth, forward, forward_backward, saved_bytes

OP = "cbam"
VARIANTS = ["fused", "naive", "timm", "compile"]


class _Naive(torch.nn.Module):
    def __init__(self, m: CBAM):
        super().__init__()
        self.m = m

    def forward(self, x):
        return ref.cbam(x, self.m.channel, self.m.spatial, pool_order=self.m.pool_order)[0]


def _model(variant: str, C: int, train: bool):
    torch.manual_seed(0)
    base = CbamModule(C).train(train)
    return {"timm": lambda: base, "fused": lambda: CBAM.from_timm(base),
            "naive": lambda: _Naive(CBAM.from_timm(base)), "compile": lambda: torch.compile(base)}[variant]()


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_copy_bandwidth(benchmark, recorder, shape):
    copy_bandwidth(benchmark, recorder, OP, shape, {"fwd": 4, "fwd+bwd": 9})


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward(benchmark, recorder, shape, variant):
    forward(benchmark, recorder, OP, variant, _model(variant, shape[1], train=False), shape)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_backward(benchmark, recorder, shape, variant):
    forward_backward(benchmark, recorder, OP, variant, _model(variant, shape[1], train=True), shape)


@pytest.mark.parametrize("variant", ["fused", "naive", "timm"])
def test_saved_for_backward_bytes(recorder, variant):
    saved_bytes(recorder, OP, variant, _model(variant, SHAPES[0][1], train=True), SHAPES[0])
