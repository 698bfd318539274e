"""SE: fused (attnkern) vs naive (the reference) vs timm eager vs torch.compile(timm).
Memory floor: forward 2 reads + 1 write; backward 2 reads (pass A) + 2 reads + 1 write (pass C)."""
from __future__ import annotations

import pytest
import torch
from timm.layers.squeeze_excite import SEModule

from attnkern.nn import SqueezeExcite
from attnkern.reference import se as ref
from gating_bench import SHAPE_IDS, SHAPES, copy_bandwidth, forward, forward_backward, saved_bytes

OP = "se"
VARIANTS = ["fused", "naive", "timm", "compile"]


class _Naive(torch.nn.Module):
    def __init__(self, m: SqueezeExcite):
        super().__init__()
        self.m = m

    def forward(self, x):
        return ref.squeeze_excite(x, self.m.mlp, gate=self.m._gate())[0]


def _model(variant: str, C: int, train: bool):
    torch.manual_seed(0)
    base = SEModule(C).train(train)
    return {"timm": lambda: base, "fused": lambda: SqueezeExcite.from_timm(base),
            "naive": lambda: _Naive(SqueezeExcite.from_timm(base)),
            "compile": lambda: torch.compile(base)}[variant]()


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


@pytest.mark.parametrize("variant", ["fused", "naive", "timm"])
def test_saved_for_backward_bytes(recorder, variant):
    saved_bytes(recorder, OP, variant, _model(variant, SHAPES[0][1], train=True), SHAPES[0])
