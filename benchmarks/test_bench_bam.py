"""BAM: fused combine (attnkern) vs naive (the reference, i.e. the paper's module in eager
PyTorch) vs torch.compile of it. The spatial branch's convs are PyTorch's in every variant.
Memory floor of the combine alone: forward 2 reads + 1 write (pool + combine); backward
2 reads (pass A) + 2 reads + 1 write (dx)."""
from __future__ import annotations

import pytest
import torch

from attnkern.nn import BAM
from attnkern.reference import bam as ref
from gating_bench import SHAPE_IDS, SHAPES, copy_bandwidth, forward, forward_backward, saved_bytes

OP = "bam"
VARIANTS = ["fused", "naive", "compile"]


class _Naive(torch.nn.Module):
    def __init__(self, m: BAM):
        super().__init__()
        self.m = m

    def forward(self, x):
        return ref.bam(x, self.m.channel, self.m.spatial, combine=self.m.combine)[0]


def _model(variant: str, C: int, train: bool):
    torch.manual_seed(0)
    base = BAM(C).train(train)
    return {"fused": lambda: base, "naive": lambda: _Naive(base),
            "compile": lambda: torch.compile(_Naive(base))}[variant]()


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_copy_bandwidth(benchmark, recorder, shape):
    copy_bandwidth(benchmark, recorder, OP, shape, {"fwd": 3, "fwd+bwd": 8})


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward(benchmark, recorder, shape, variant):
    forward(benchmark, recorder, OP, variant, _model(variant, shape[1], train=False), shape)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_backward(benchmark, recorder, shape, variant):
    forward_backward(benchmark, recorder, OP, variant, _model(variant, shape[1], train=True), shape)


@pytest.mark.parametrize("variant", ["fused", "naive"])
def test_saved_for_backward_bytes(recorder, variant):
    saved_bytes(recorder, OP, variant, _model(variant, SHAPES[0][1], train=True), SHAPES[0])
