"""NaN, +-Inf and very large values through both kernel backends (C++ and Triton under the
interpreter), primitive by primitive and block by block, against the reference.

- A NaN anywhere in a row (first element, inside the vectorised body, in the scalar tail) makes
  that row's mean and max NaN, as torch.mean / torch.amax do, in every vector ISA's copy of the
  C++ kernels; rows of +-Inf keep exact maxima
  and tie counts; +Inf and -Inf in one row give a NaN mean. Outputs and gradients of the blocks
  carry exactly the reference's NaN / +Inf / -Inf pattern. Nothing crashes or hangs.
- float16 inputs near the top of its range (|x| up to 6e4) do not overflow: statistics and
  gates are float32, so the output and the input gradient stay finite and match the float32
  reference.
"""
from __future__ import annotations

import copy
import os
from unittest import mock

import pytest
import torch

from attnkern import _cpu
from attnkern import functional as AF
from attnkern.nn import BAM, CBAM, SqueezeExcite
from attnkern.reference import bam as ref_bam
from attnkern.reference import cbam as ref_cbam
from attnkern.reference import gating as ref
from attnkern.reference import se as ref_se
from tests.tolerance import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

NAN, INF = float("nan"), float("inf")


def _kernels(name):
    if name == "cpu":
        return _cpu.require()
    from attnkern.triton import gating

    return gating


@pytest.fixture(params=["cpu", "triton"])
def backend(request):
    return request.param


def _pattern(t: torch.Tensor):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def assert_same_pattern(got: torch.Tensor, exp: torch.Tensor, name: str) -> None:
    for a, b, what in zip(_pattern(got), _pattern(exp), ("NaN", "+Inf", "-Inf")):
        if not torch.equal(a, b):
            idx = (a != b).nonzero()[0].tolist()
            raise AssertionError(f"{name}: {what} pattern differs from the reference, first at {idx}: "
                                 f"got {got[tuple(idx)].item()}, reference {exp[tuple(idx)].item()}")


# ------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------

def _special_input(shape, layout, dtype):
    """Random x with NaN at the first, a middle and the last pixel of three rows, a row of
    -Inf, a row with tied +Inf, a row with +Inf and -Inf, a pixel of NaN across all channels,
    and a whole row of NaN; everything else finite."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x[0, 0, 0, 0] = NAN                       # first element of a row
    x[0, 1, H // 2, W // 2] = NAN             # inside the vector body
    x[0, 2, H - 1, W - 1] = NAN               # the scalar tail
    x[0, 3] = -INF                            # a row of -Inf: max -Inf, count H*W
    x[0, 4, 0, : min(3, W)] = INF             # tied +Inf
    x[0, 5, 0, 0], x[0, 5, H - 1, W - 1] = INF, -INF  # mean NaN, max +Inf
    x[B - 1, 6:, H - 1, 0] = NAN              # one pixel NaN in every channel from 6 on
    x[B - 1, C - 1] = NAN                     # a whole row of NaN
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


SHAPES = [(2, 37, 5, 7), (1, 9, 48, 100), (2, 200, 3, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_primitives_nan_inf(backend, shape, layout, dtype):
    if backend == "triton" and shape[1] * shape[2] * shape[3] > 4000 and dtype != torch.float32:
        pytest.skip("one dtype of the big shapes under the interpreter is enough")
    k = _kernels(backend)
    if backend == "triton":
        _check_primitives_nan_inf(k, shape, layout, dtype)
        return
    # the C++ kernels: every vector ISA's copy (their max updates leave NaN to a rescan)
    before = _cpu.cpu_capability()
    try:
        for capability in _cpu.cpu_capabilities():
            _cpu.set_cpu_capability(capability)
            try:
                _check_primitives_nan_inf(k, shape, layout, dtype)
            except AssertionError as e:
                raise AssertionError(f"{capability} copy: {e}") from e
    finally:
        _cpu.set_cpu_capability(before)


def _check_primitives_nan_inf(k, shape, layout, dtype):
    x = _special_input(shape, layout, dtype)
    B, C, H, W = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(1)
    gc = (torch.rand(B, C, generator=g) + 0.5).to(acc)
    gs = (torch.rand(B, H * W, generator=g) + 0.5).to(acc)

    for what, got, exp in (("channel", k.channel_stats(x), ref.channel_stats(x)),
                           ("spatial", k.spatial_stats(x, gc), ref.spatial_stats(x, gc))):
        for i, n in ((0, "mean"), (1, "max")):
            assert_same_pattern(got[i], exp[i], f"{what} {n}")
            fin = exp[i][torch.isfinite(exp[i])]
            assert_close(got[i], exp[i], dtype=acc, name=f"{what} {n}",
                         scale=float(fin.abs().max()) if fin.numel() else 0.0)
        # tie counts, exact; a NaN max is equalled by no element: count 0, as the reference
        assert torch.equal(got[2], exp[2]), f"{what} count"
    cnt = k.channel_stats(x)[2]
    assert int(cnt[0, 3]) == H * W and int(cnt[0, 4]) == min(3, W), "counts of -Inf / +Inf rows"

    for gates in ((gc, gs), (gc, None), (None, gs)):
        out = k.gate_apply(x, *gates)
        assert_same_pattern(out, ref.gate_apply(x, *gates), "gate_apply")
    for product in (False, True):
        mc, ms = torch.randn(B, C, generator=g).to(acc), torch.randn(B, H * W, generator=g).to(acc)
        assert_same_pattern(k.bam_combine(x, mc, ms, product), ref.bam_combine(x, mc, ms, product),
                            "bam_combine")
    dout = torch.randn(shape, generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    for got, exp, n in zip(k.gate_apply_backward(dout, x, gc, gs, True, True),
                           ref.gate_apply_backward(dout, x, gc, gs, True, True), ("dgc", "dgs")):
        assert_same_pattern(got, exp, n)


# ------------------------------------------------------------------------------------------
# blocks
# ------------------------------------------------------------------------------------------

def _blocks():
    torch.manual_seed(0)
    C = 24
    cbam = CBAM(C, rd_channels=4)
    se = SqueezeExcite(C, rd_channels=4, add_maxpool=True)
    bam = BAM(C, rd_channels=4, num_dilated=1, combine="product")
    return {
        "cbam": (cbam, lambda m, x: ref_cbam.cbam(x, m.channel, m.spatial, gate=m.channel.gate)[0]),
        "se": (se, lambda m, x: ref_se.squeeze_excite(x, m.mlp, gate=m._gate(), add_maxpool=True)[0]),
        "bam": (bam, lambda m, x: ref_bam.bam(x, m.channel, m.spatial, combine=m.combine)[0]),
    }


def _block_input(layout, dtype):
    """Batch 0: one NaN; batch 1: +Inf and -Inf values; batch 2: finite."""
    x = torch.randn(3, 24, 9, 11, generator=torch.Generator().manual_seed(2))
    x[0, 5, 4, 10] = NAN
    x[1, 3, 0, 0] = INF
    x[1, 7, 8, 3] = -INF
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("block", ["cbam", "se", "bam"])
def test_blocks_nan_inf_pattern(backend, block, layout, train):
    module, reference = _blocks()[block]
    module = module.train(train)
    x = _block_input(layout, torch.float32)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    m_ours, m_ref = copy.deepcopy(module), copy.deepcopy(module)
    with mock.patch.dict(os.environ, {"ATTNKERN_BACKEND": backend}):
        out = m_ours(xa)
        out.backward(g)
    r = reference(m_ref, xr)
    r.backward(g)
    assert_same_pattern(out, r, "out")
    assert_same_pattern(xa.grad, xr.grad, "dx")
    for (n, p), q in zip(m_ours.named_parameters(), m_ref.parameters()):
        assert_same_pattern(p.grad, q.grad, n)
    if not train:  # batches are independent: the finite one is unaffected
        assert torch.isfinite(out[2]).all() and torch.isfinite(xa.grad[2]).all()
        assert_close(out[2], r[2], name="finite batch out")
        assert_close(xa.grad[2], xr.grad[2], name="finite batch dx")


# ------------------------------------------------------------------------------------------
# float16 near its largest value
# ------------------------------------------------------------------------------------------

def _fp32_branches(C):
    torch.manual_seed(4)
    mlp = torch.nn.Sequential(torch.nn.Linear(C, 4), torch.nn.ReLU(), torch.nn.Linear(4, C))
    conv = torch.nn.Conv2d(2, 1, 3, padding=1)
    bam_sp = torch.nn.Conv2d(C, 1, 1)
    with torch.no_grad():  # logits of moderate size for inputs of ~1e4
        for lin in (mlp[0], mlp[2], conv, bam_sp):
            lin.weight.mul_(1e-4)
    return mlp, conv, bam_sp


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["cbam", "squeeze_excite", "bam"])
def test_float16_large_values_do_not_overflow(backend, op, layout):
    C = 24
    g = torch.Generator().manual_seed(5)
    # |x| in [3e4, 6e4]: any float16 sum of two of them overflows (max 65504); half that for
    # BAM, whose output x * (1 + sigmoid) reaches 2|x|
    lo = 1.6e4 if op == "bam" else 3e4
    x32 = (torch.rand(2, C, 7, 9, generator=g) * lo + lo) * torch.where(
        torch.rand(2, C, 7, 9, generator=g) < 0.3, -1.0, 1.0)
    x = x32.half().contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    dout = torch.randn(x.shape, generator=g).half()
    mlp, conv, bam_sp = _fp32_branches(C)
    spatial = lambda t: bam_sp(t.float())  # noqa: E731  (BAM's branch sees x itself)
    fns = {
        "cbam": lambda t: AF.cbam(t, mlp, conv)[0],
        "squeeze_excite": lambda t: AF.squeeze_excite(t, mlp, add_maxpool=True)[0],
        "bam": lambda t: AF.bam(t, mlp, spatial)[0],
    }
    refs = {
        "cbam": lambda t: ref_cbam.cbam(t, mlp, conv)[0],
        "squeeze_excite": lambda t: ref_se.squeeze_excite(t, mlp, add_maxpool=True)[0],
        "bam": lambda t: ref_bam.bam(t, mlp, spatial)[0],
    }
    xa = x.clone().requires_grad_()
    with mock.patch.dict(os.environ, {"ATTNKERN_BACKEND": backend}):
        out = fns[op](xa)
        out.backward(dout)
    xr = x.float().requires_grad_()
    r = refs[op](xr)
    r.backward(dout.float())
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all(), "output overflowed"
    assert torch.isfinite(xa.grad).all(), "input gradient overflowed"
    # the float32 reference rounded to float16 is the best a float16 output can be
    assert_close(out, r, r.half(), dtype=torch.float16, name="out")
    assert_close(xa.grad, xr.grad, xr.grad.half(), dtype=torch.float16, grad=True, name="dx")
