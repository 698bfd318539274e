"""Checks of one backend's gating primitives against attnkern.reference.gating, shared by
tests/cpu/test_gating.py and tests/triton/test_gating.py (same cases for every backend)."""
from __future__ import annotations

import pytest
import torch

from attnkern.reference import gating as ref
from tests.cases import make_input
from tests.tolerance import assert_close


def _small(B, n, seed, kind="gate", device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, n, generator=g)
    return (torch.sigmoid(t) if kind == "gate" else t).to(device)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, layout, dtype, ties=False, device="cpu"):
    x = make_input(shape, layout, dtype, device=device)
    if ties:  # rounded ReLU outputs: few distinct values, so maxima tie
        x = torch.relu(torch.round(x))
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    B, C, H, W = shape
    a = _acc(dtype)
    gc, gs = _small(B, C, 1, device=device).to(a), _small(B, H * W, 2, device=device).to(a)
    dout = make_input(shape, "channels_last" if layout == "channels_last" else "contiguous", dtype, seed=3,
                      device=device)
    return x, gc, gs, dout


def _close_small(actual, expected, name, dtype):
    """Statistics and gate gradients: both sides compute in the accumulation dtype from the same
    inputs, so only summation order differs."""
    assert actual.dtype == expected.dtype, name
    assert_close(actual, expected, dtype=_acc(dtype), name=name,
                 scale=float(expected.abs().max()) if expected.numel() else 0.0)


def _close_big(mod, fn, args_lp, args_32, dtype, name):
    """A big output in x's dtype: vs the reference on float32 inputs under the tolerance rule."""
    out = getattr(mod, fn)(*args_lp)
    r32 = getattr(ref, fn)(*args_32)
    r_lp = getattr(ref, fn)(*args_lp) if dtype in (torch.float16, torch.bfloat16) else None
    assert out.dtype == dtype and out.shape == args_lp[0].shape
    assert out.stride() == args_lp[0].stride(), f"{name}: memory format not kept"
    assert_close(out, r32, r_lp, dtype=dtype if r_lp is not None else _acc(dtype), name=name)


def check_primitives(mod, shape, layout, dtype, ties=False, device="cpu"):
    x, gc, gs, dout = _inputs(shape, layout, dtype, ties, device)
    f32 = lambda t: t.to(_acc(dtype)) if t is not None and t.dtype == dtype else t  # noqa: E731
    B, C, H, W = shape

    # forward statistics
    for got, exp, n in zip(mod.channel_stats(x), ref.channel_stats(x), ("cmean", "cmax", "ccount")):
        if n == "ccount":
            assert torch.equal(got, exp), n
        else:
            _close_small(got, exp, n, dtype)
    for got, exp, n in zip(mod.spatial_stats(x, gc), ref.spatial_stats(x, gc), ("smean", "smax", "scount")):
        if n == "scount":
            assert torch.equal(got, exp), n
        else:
            _close_small(got, exp, n, dtype)
    if ties:
        assert int(ref.channel_stats(x)[2].max()) > 1, "the tie case must have ties"

    # apply, every gate combination (CBAM: both; SE: gc only)
    for a, b, n in ((gc, gs, "apply gc gs"), (gc, None, "apply gc"), (None, gs, "apply gs")):
        _close_big(mod, "gate_apply", (x, a, b), (f32(x), a, b), dtype, n)

    # apply in place with a residual block's add and ReLU (inference), CBAM's and SE's gates
    res = make_input(shape, "channels_last" if layout == "channels_last" else "contiguous", dtype, seed=11,
                     device=device)
    for a, b in ((gc, gs), (gc, None)):
        for relu in (False, True):
            xi = x.clone()
            out = mod.gate_apply_residual_(xi, a, b, res, relu)
            assert out.data_ptr() == xi.data_ptr() and out.stride() == x.stride(), "not in place"
            exp32 = ref.gate_apply_residual_(x.to(_acc(dtype), copy=True), a, b, res.to(_acc(dtype)), relu)
            exp_lp = (ref.gate_apply_residual_(x.clone(), a, b, res, relu)
                      if dtype in (torch.float16, torch.bfloat16) else None)
            assert_close(out, exp32, exp_lp, dtype=dtype if exp_lp is not None else _acc(dtype),
                         name=f"apply+residual{'+relu' if relu else ''}{' (se)' if b is None else ''}")
            if relu:
                assert bool((out >= 0).all())
            # the same out of place (training): x unchanged, a new tensor in x's layout
            x_before = x.clone()
            _close_big(mod, "gate_apply_residual", (x, a, b, res, relu), (f32(x), a, b, f32(res), relu), dtype,
                       f"apply+residual{'+relu' if relu else ''}{' (se)' if b is None else ''}, out of place")
            assert torch.equal(x, x_before), "gate_apply_residual wrote into x"

    # pass A
    for a, b in ((gc, gs), (gc, None)):
        got = mod.gate_apply_backward(dout, x, a, b, True, b is not None)
        exp = ref.gate_apply_backward(dout, x, a, b, True, b is not None)
        _close_small(got[0], exp[0], "dgc", dtype)
        if b is not None:
            _close_small(got[1], exp[1], "dgs", dtype)
        else:
            assert got[1].numel() == 0  # no gs: no gradient of it

    # pass B with real statistics, so the max masks select something
    _, smax, scount = ref.spatial_stats(x, gc)
    _, cmax, ccount = ref.channel_stats(x)
    a = _acc(dtype)
    dsm, dsx = _small(B, H * W, 4, "grad", device).to(a), _small(B, H * W, 5, "grad", device).to(a)
    dcm, dcx = _small(B, C, 6, "grad", device).to(a), _small(B, C, 7, "grad", device).to(a)
    _close_small(mod.spatial_stats_backward(x, gc, smax, scount, dsm, dsx), ref.spatial_stats_backward(x, gc, smax, scount, dsm, dsx),
                 "dgc_b", dtype)

    # pass C: CBAM (every term), SE (dout, gc, channel mean), stats-only (no dout)
    combos = {
        "cbam": (dout, gc, gs, smax, scount, dsm, dsx, cmax, ccount, dcm, dcx),
        "se": (dout, gc, None, None, None, None, None, None, None, dcm, None),
        "se-maxpool": (dout, gc, None, None, None, None, None, cmax, ccount, dcm, dcx),
        "stats-only": (None, gc, None, smax, scount, dsm, dsx, cmax, ccount, dcm, dcx),
    }
    for n, args in combos.items():
        args32 = tuple(f32(t) for t in args)
        _close_big(mod, "gating_input_grad", (x,) + args, (f32(x),) + args32, dtype, f"dx {n}")

    # BAM's combine
    mc, ms = _small(B, C, 8, "grad", device).to(a), _small(B, H * W, 9, "grad", device).to(a)
    for product in (False, True):
        _close_big(mod, "bam_combine", (x, mc, ms, product), (f32(x), mc, ms, product), dtype, "bam out")
        got = mod.bam_combine_backward(dout, x, mc, ms, product)
        exp = ref.bam_combine_backward(dout, x, mc, ms, product)
        _close_small(got[0], exp[0], "dmc", dtype)
        _close_small(got[1], exp[1], "dms", dtype)
        _close_big(mod, "bam_input_grad", (x, dout, mc, ms, product, dcm), (f32(x), f32(dout), mc, ms, product, dcm),
                   dtype, "bam dx")
        _close_big(mod, "bam_input_grad", (x, None, mc, ms, product, dcm), (f32(x), None, mc, ms, product, dcm),
                   dtype, "bam dx (mean term only)")
        # with the input gradient of the spatial branch's 1x1 projection (R = 3) in the same pass
        fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
        gp = _small(B, 3 * H * W, 10, "grad", device).to(a).view(B, 3, H, W).contiguous(memory_format=fmt)
        pw = _small(3, C, 11, "grad", device).to(a)
        for g_out, n in ((dout, "bam dx + projection"), (None, "bam dx (mean + projection)")):
            _close_big(mod, "bam_input_grad", (x, g_out, mc, ms, product, dcm, gp, pw),
                       (f32(x), f32(g_out), mc, ms, product, dcm, gp, pw), dtype, n)


def check_deterministic(mod, device="cpu"):
    x, gc, gs, dout = _inputs((2, 40, 23, 19), "channels_last", torch.float32, device=device)
    for _ in range(2):
        runs = [mod.channel_stats(x), mod.spatial_stats(x, gc), (mod.gate_apply(x, gc, gs),),
                mod.gate_apply_backward(dout, x, gc, gs, True, True)]
        if _ == 0:
            first = runs
    for a, b in zip(first, runs):
        for t, u in zip(a, b):
            assert torch.equal(t, u)


def check_rejects_non_dense(mod, device="cpu"):
    x = make_input((2, 8, 5, 6), "sliced", torch.float32, device=device)
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        mod.channel_stats(x)
    with pytest.raises((ValueError, RuntimeError)):
        mod.gate_apply(torch.randn(2, 8, 5, 6, device=device), torch.rand(3, 8, device=device), None)  # wrong gate size
    y = torch.randn(2, 8, 5, 6, device=device)
    with pytest.raises((ValueError, RuntimeError), match="residual"):
        mod.gate_apply_residual_(y, None, None, y, True)  # the residual is x itself
    with pytest.raises((ValueError, RuntimeError), match="residual"):  # a residual in another layout
        mod.gate_apply_residual_(y, None, None, y.clone().contiguous(memory_format=torch.channels_last), True)
    with pytest.raises((ValueError, RuntimeError), match="residual"):
        mod.gate_apply_residual(y, None, None, y.clone().contiguous(memory_format=torch.channels_last), True)
    with pytest.raises((ValueError, RuntimeError), match="residual"):  # a residual of another shape
        mod.gate_apply_residual(y, None, None, y[:, :4].contiguous(), True)
    with pytest.raises((ValueError, RuntimeError), match="residual"):  # a residual of another dtype
        mod.gate_apply_residual(y, None, None, y.double(), True)
