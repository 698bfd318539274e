"""CBAM: fused (attnkern) vs naive (the reference) vs timm eager vs torch.compile(timm).

Run with ``pytest --benchmark benchmarks/test_bench_cbam.py``; rows go to
``benchmarks/results.csv`` and ``python benchmarks/report.py`` writes RESULTS.md. Each shape
also times ``x.clone()`` (one read + one write) in the same run: the memory floor of a pass
structure is its bytes at that bandwidth (forward 3 reads + 1 write; forward+backward adds the
backward's 4 reads + 1 write of DESIGN.md's floor — the fused backward does 5 reads + 1 write).
"""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers.cbam import CbamModule

from attnkern.nn import CBAM
from attnkern.reference import cbam as ref

SHAPES = [(8, 256, 56, 56), (32, 64, 112, 112), (16, 512, 28, 28)]
VARIANTS = ["fused", "naive", "timm", "compile"]
FLOOR_TRANSFERS = {"fwd": 4, "fwd+bwd": 9}  # reads + writes of x's size


class _Naive(torch.nn.Module):
    """The reference math as a module (the benchmarks' "naive")."""

    def __init__(self, m: CBAM):
        super().__init__()
        self.m = m

    def forward(self, x):
        return ref.cbam(x, self.m.channel, self.m.spatial, pool_order=self.m.pool_order)[0]


_compiled = {}


def _model(variant: str, C: int, train: bool):
    torch.manual_seed(0)
    base = CbamModule(C).train(train)
    if variant == "timm":
        return base
    if variant == "fused":
        return CBAM.from_timm(base)
    if variant == "naive":
        return _Naive(CBAM.from_timm(base))
    if variant == "compile":
        key = (C, train)
        if key not in _compiled:
            _compiled[key] = torch.compile(base)
        return _compiled[key]
    raise ValueError(variant)


def _x(shape):
    return torch.randn(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_copy_bandwidth(benchmark, recorder, shape):
    x = _x(shape)
    med = recorder.time(benchmark, lambda: x.clone(), op="cbam", variant="copy", pass_="clone",
                        shape=shape, dtype=torch.float32, rounds=15)
    recorder.row("cbam", "copy", "clone", shape, torch.float32, "GB_per_s",
                 2 * x.numel() * x.element_size() / med / 1e9)
    for pass_, transfers in FLOOR_TRANSFERS.items():
        recorder.row("cbam", "floor", pass_, shape, torch.float32, "time_ms", med * 1e3 * transfers / 2)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(benchmark, recorder, shape, variant):
    m = _model(variant, shape[1], train=False)
    x = _x(shape)

    def fwd():
        with torch.no_grad():
            m(x)

    for _ in range(2 if variant == "compile" else 0):
        fwd()  # compile outside the timed rounds
    recorder.time(benchmark, fwd, op="cbam", variant=variant, pass_="fwd", shape=shape,
                  dtype=torch.float32, rounds=7)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(benchmark, recorder, shape, variant):
    m = _model(variant, shape[1], train=True)
    x = _x(shape).requires_grad_()
    g = torch.randn(shape)

    def step():
        x.grad = None
        m(x).backward(g)

    for _ in range(2 if variant == "compile" else 0):
        step()
    recorder.time(benchmark, step, op="cbam", variant=variant, pass_="fwd+bwd", shape=shape,
                  dtype=torch.float32, rounds=7)


@pytest.mark.parametrize("variant", ["fused", "naive", "timm"])
def test_saved_for_backward_bytes(recorder, variant):
    """Bytes autograd keeps for backward (unique storages), relative to the input's bytes.
    Exact and machine-independent; torch.compile's saved activations are not visible to the
    hooks and are not reported."""
    shape = SHAPES[0]
    m = _model(variant, shape[1], train=True)
    x = _x(shape).requires_grad_()
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    ratio = sum(seen.values()) / (x.numel() * x.element_size())
    recorder.row("cbam", variant, "saved", shape, torch.float32, "saved_over_input", ratio)
