"""gating_input_grad: the input gradient of a CBAM or SE block, every term optional, written
once (one read of grad_out and x, one write)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._gating_common import (_check_big, _check_small, _check_x, _err, _launch_elementwise, _placeholder,
                             _tile_coords)
from ._launch import device_guard as _device_guard


@triton.jit
def _gating_input_grad_kernel(x_ptr, d_ptr, dx_ptr, gc_ptr, gs_ptr, smax_ptr, scnt_ptr, dsmean_ptr,
                       dsmax_ptr, cmax_ptr, ccnt_ptr, dcmean_ptr, dcmax_ptr,
                       C, HW, sB, sC, sHW, NCB, NHB,
                       HAS_DOUT: tl.constexpr, HAS_GC: tl.constexpr, HAS_GS: tl.constexpr,
                       HAS_SMEAN: tl.constexpr, HAS_SMAX: tl.constexpr,
                       HAS_CMEAN: tl.constexpr, HAS_CMAX: tl.constexpr, CL: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """dx = dout*gc*gs + gc*(dsmean/C + dsmax*[x*gc == smax]/scount)
            + dcmean/HW + dcmax*[x == cmax]/ccount for one tile, every term optional."""
    b, cb, hb = _tile_coords(NCB, NHB, CL)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_c = offs_c < C
    mask_hw = offs_hw < HW
    mask = mask_c[:, None] & mask_hw[None, :]
    off = b * sB + offs_c.to(tl.int64)[:, None] * sC + offs_hw.to(tl.int64)[None, :] * sHW
    pc = b * C + offs_c
    ph = b * HW + offs_hw
    if HAS_GC:
        g = tl.load(gc_ptr + pc, mask=mask_c, other=0.0)[:, None]
    dx = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    if HAS_DOUT:
        t = tl.load(d_ptr + off, mask=mask, other=0.0).to(ACC)
        if HAS_GC:
            t = t * g
        if HAS_GS:
            t = t * tl.load(gs_ptr + ph, mask=mask_hw, other=0.0)[None, :]
        dx += t
    if HAS_SMAX or HAS_CMAX:
        v = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    if HAS_SMEAN or HAS_SMAX:
        sp = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
        if HAS_SMEAN:
            sp += (tl.load(dsmean_ptr + ph, mask=mask_hw, other=0.0) / C)[None, :]
        if HAS_SMAX:
            inv_cnt = 1.0 / tl.load(scnt_ptr + ph, mask=mask_hw, other=1).to(ACC)
            dsmax = tl.load(dsmax_ptr + ph, mask=mask_hw, other=0.0)
            smax = tl.load(smax_ptr + ph, mask=mask_hw, other=0.0)
            sel = tl.where(v * g == smax[None, :], 1.0, 0.0).to(ACC)
            sp += dsmax[None, :] * (sel * inv_cnt[None, :])
        dx += sp * g
    if HAS_CMEAN:
        dx += (tl.load(dcmean_ptr + pc, mask=mask_c, other=0.0) / HW)[:, None]
    if HAS_CMAX:
        inv_ccnt = 1.0 / tl.load(ccnt_ptr + pc, mask=mask_c, other=1).to(ACC)
        dcmax = tl.load(dcmax_ptr + pc, mask=mask_c, other=0.0)
        cmax = tl.load(cmax_ptr + pc, mask=mask_c, other=0.0)
        sel_c = tl.where(v == cmax[:, None], 1.0, 0.0).to(ACC)
        dx += dcmax[:, None] * (sel_c * inv_ccnt[:, None])
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def gating_input_grad(x: Tensor, grad_out: Optional[Tensor], gc: Optional[Tensor], gs: Optional[Tensor],
                      smax: Optional[Tensor] = None, scount: Optional[Tensor] = None,
                      grad_smean: Optional[Tensor] = None, grad_smax: Optional[Tensor] = None,
                      cmax: Optional[Tensor] = None, ccount: Optional[Tensor] = None,
                      grad_cmean: Optional[Tensor] = None, grad_cmax: Optional[Tensor] = None) -> Tensor:
    """The input gradient of a gating block, every term optional, written once:

    dx = grad_out * gc * gs + gc * (grad_smean / C + grad_smax * [x*gc == smax] / scount)
       + grad_cmean / HW + grad_cmax * [x == cmax] / ccount

    Spatial terms need gc; grad_smax needs smax and scount; grad_cmax needs cmax and ccount.
    """
    fn = "gating_input_grad"
    L = _check_x(x, fn)
    if grad_out is not None:
        _check_big(grad_out, "grad_out", x, L, fn)
    n_c, n_hw = L.B * L.C, L.B * L.HW
    for t, name, n in ((gc, "gc", n_c), (gs, "gs", n_hw), (smax, "smax", n_hw),
                       (grad_smean, "grad_smean", n_hw), (grad_smax, "grad_smax", n_hw), (cmax, "cmax", n_c),
                       (grad_cmean, "grad_cmean", n_c), (grad_cmax, "grad_cmax", n_c)):
        _check_small(t, name, n, x, fn, L.acc)
    _check_small(scount, "scount", n_hw, x, fn, torch.int32)
    _check_small(ccount, "ccount", n_c, x, fn, torch.int32)
    if grad_smax is not None and (smax is None or scount is None):
        raise ValueError(_err(fn, "grad_smax needs smax and scount"))
    if grad_cmax is not None and (cmax is None or ccount is None):
        raise ValueError(_err(fn, "grad_cmax needs cmax and ccount"))
    if (grad_smean is not None or grad_smax is not None) and gc is None:
        raise ValueError(_err(fn, "the spatial-statistics terms (grad_smean, grad_smax) need gc"))
    ph = _placeholder(x, L.acc)
    phi = _placeholder(x, torch.int32)
    opt = lambda t, p=ph: t if t is not None else p  # noqa: E731
    dx = torch.empty_like(x)
    with _device_guard(x):
        _launch_elementwise(
            _gating_input_grad_kernel, L, x, opt(grad_out, x), dx, opt(gc), opt(gs), opt(smax), opt(scount, phi),
            opt(grad_smean), opt(grad_smax), opt(cmax), opt(ccount, phi), opt(grad_cmean), opt(grad_cmax),
            HAS_DOUT=grad_out is not None, HAS_GC=gc is not None, HAS_GS=gs is not None,
            HAS_SMEAN=grad_smean is not None, HAS_SMAX=grad_smax is not None,
            HAS_CMEAN=grad_cmean is not None, HAS_CMAX=grad_cmax is not None)
    return dx

