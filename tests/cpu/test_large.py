"""The C++ kernels on a bfloat16 tensor of more than 2**31 elements (4 GiB): every offset is
64-bit, so the elements past 2**31 are read and written where they are.

x is [1, 2**15 + 1, 256, 256]: in NCHW its last channel starts exactly at element 2**31, in
channels_last its last pixels lie past 2**31. Values: a random block of 257 channels tiled over
the tensor (257 does not divide the 32768 channels of 2**31 elements, so an offset that wrapped
around 2**31 would land on different values) and the last channels random on their own. Each
result is checked at the far end (and the near end) against the reference computed on that
slice only. Peak memory: two such tensors, 8 GiB.
"""
from __future__ import annotations

import gc as _gc

import pytest
import torch

from attnkern import _cpu
from attnkern.reference import gating as ref
from tests.tolerance import assert_close

pytestmark = pytest.mark.bigmem

C, H, W = 2**15 + 1, 256, 256
NUMEL = C * H * W
NEED_GIB = 9.0


@pytest.fixture(scope="module")
def ext():
    return _cpu.require()


def _check_memory():
    import psutil

    avail = psutil.virtual_memory().available / 2**30
    if avail < NEED_GIB:
        pytest.skip(f"needs {NEED_GIB:.0f} GiB of free memory for two 4 GiB tensors, "
                    f"{avail:.1f} GiB available")


def _make(layout: str) -> torch.Tensor:
    assert NUMEL > 2**31
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(1, C, H, W, dtype=torch.bfloat16, memory_format=fmt)
    blk = torch.randn(257, H, W, generator=g).to(torch.bfloat16)
    for i in range(0, C, 257):
        n = min(257, C - i)
        x[0, i:i + n] = blk[:n]
    x[0, -3:] = torch.randn(3, H, W, generator=g).to(torch.bfloat16)
    x[0, :, -1, -4:] = torch.randn(C, 4, generator=g).to(torch.bfloat16)  # the last pixels
    return x


def _small(got, exp, name):
    assert_close(got, exp, dtype=torch.float32, name=name, scale=float(exp.abs().max()))


def _big(got, fn, args_lp, name):
    """A bfloat16 result slice against the reference on float32 and on bfloat16 inputs."""
    f32 = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args_lp)
    assert_close(got, getattr(ref, fn)(*f32), getattr(ref, fn)(*args_lp), dtype=torch.bfloat16, name=name)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_past_2_31_elements(ext, layout):
    _check_memory()
    x = _make(layout)
    assert x.numel() > 2**31
    g = torch.Generator().manual_seed(1)
    gc = torch.rand(1, C, generator=g) + 0.5
    gs = torch.rand(1, H * W, generator=g) + 0.5
    far, near = slice(C - 3, C), slice(0, 2)          # channels
    px = slice(H * W - 4, H * W)                      # the last 4 pixels (row H-1, last 4 columns)
    xpx = x[:, :, H - 1:, W - 4:]

    # channel statistics of the first and the last channels
    cm, cx, cc = ext.channel_stats(x)
    for sl, where in ((far, "far"), (near, "near")):
        em, ex, ec = ref.channel_stats(x[:, sl])
        _small(cm[:, sl], em, f"channel mean ({where})")
        _small(cx[:, sl], ex, f"channel max ({where})")
        assert torch.equal(cc[:, sl], ec), f"channel count ({where})"

    # spatial statistics (over all C) of the last pixels
    sm, sx, sc = ext.spatial_stats(x, gc)
    em, ex, ec = ref.spatial_stats(xpx, gc)
    _small(sm[:, px], em, "spatial mean (last pixels)")
    _small(sx[:, px], ex, "spatial max (last pixels)")
    assert torch.equal(sc[:, px], ec), "spatial count (last pixels)"

    # gate_apply writes past 2**31
    out = ext.gate_apply(x, gc, gs)
    assert out.stride() == x.stride()
    _big(out[:, far], "gate_apply", (x[:, far], gc[:, far], gs), "gate_apply (far channels)")
    _big(out[:, near], "gate_apply", (x[:, near], gc[:, near], gs), "gate_apply (near channels)")
    _big(out[:, :, H - 1:, W - 4:], "gate_apply", (xpx, gc, gs[:, px]), "gate_apply (last pixels)")
    del out
    _gc.collect()

    # pass A (dout = x): gate gradients of the far channels and of the last pixels
    dgc, dgs = ext.gate_apply_backward(x, x, gc, gs, True, True)
    e_dgc, _ = ref.gate_apply_backward(x[:, far], x[:, far], gc[:, far], gs, True, False)
    _small(dgc[:, far], e_dgc, "dgc (far channels)")
    _, e_dgs = ref.gate_apply_backward(xpx, xpx, gc, gs[:, px], False, True)
    _small(dgs[:, px], e_dgs, "dgs (last pixels)")

    # pass C, every term, writes dx past 2**31
    dsm, dsx = torch.randn(1, H * W, generator=g), torch.randn(1, H * W, generator=g)
    dcm, dcx = torch.randn(1, C, generator=g), torch.randn(1, C, generator=g)
    dx = ext.gating_input_grad(x, x, gc, gs, sx, sc, dsm, dsx, cx, cc, dcm, dcx)
    # (the reference divides dsmean by the slice's 3 channels: hand it dsmean * 3 / C)
    _big(dx[:, far], "gating_input_grad", (x[:, far], x[:, far], gc[:, far], gs, sx, sc, dsm * (3 / C), dsx, cx[:, far],
                                    cc[:, far], dcm[:, far], dcx[:, far]), "dx (far channels)")
    del dx
    _gc.collect()

    # BAM's combine
    mc, ms = torch.randn(1, C, generator=g), torch.randn(1, H * W, generator=g)
    out = ext.bam_combine(x, mc, ms, False)
    _big(out[:, far], "bam_combine", (x[:, far], mc[:, far], ms, False), "bam_combine (far channels)")
