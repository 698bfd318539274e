"""Triton kernels of the pooled-gating primitives shared by CBAM, SE and BAM.

Same functions, arguments and results as :mod:`attnkern.reference.gating` (the ground truth)
and the C++ backend. x is read as ``[B, C, HW]`` through its strides, so NCHW and
channels_last tensors are both taken without a copy: a tile is ``[BLOCK_C, BLOCK_HW]`` and the
tile shape follows the layout (long along HW for NCHW, long along C for channels_last) so
loads are coalesced along the contiguous dimension.

- Accumulation in fp32 whatever the input dtype; gates and statistics are fp32 tensors.
  Inputs: float32, bfloat16, float16 (``SUPPORTED_DTYPES``); other dtypes (float64) are sent to
  the reference by the ops layer.
- Reductions loop over the reduced axis inside one program, or write per-block partials that
  a second small kernel sums in a fixed order: no atomics, bitwise reproducible.
- Offsets are computed in int64 (a batch of slide tiles may pass 2^31 elements).
- Max pooling carries a tie count; NaN in a reduced row makes its max NaN (as torch.amax).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "SUPPORTED_DTYPES", "channel_stats", "spatial_stats", "gate_apply", "gate_bwd_a",
    "cbam_bwd_b", "gate_bwd_c", "bam_combine", "bam_combine_bwd", "bam_dx",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_x(x: Tensor, fn: str) -> Tuple[int, int, int, bool]:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"attnkern.triton.{fn}: x must be a 4-D tensor [B, C, H, W]")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"attnkern.triton.{fn}: x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"attnkern.triton.{fn}: x must not be empty, got shape {tuple(x.shape)}")
    if x.is_contiguous():
        cl = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        cl = True
    else:
        raise ValueError(f"attnkern.triton.{fn}: x must be NCHW- or channels_last-contiguous, "
                         f"got strides {x.stride()}")
    B, C, H, W = x.shape
    return B, C, H * W, cl


def _check_big(t: Tensor, name: str, x: Tensor, cl: bool, fn: str) -> None:
    fmt = torch.channels_last if cl else torch.contiguous_format
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device or not t.is_contiguous(memory_format=fmt):
        raise ValueError(f"attnkern.triton.{fn}: {name} must match x's shape, dtype, device and memory format")


def _check_small(t: Optional[Tensor], name: str, n: int, fn: str, dtype=torch.float32) -> None:
    if t is None:
        return
    if t.dtype != dtype or t.numel() != n or not t.is_contiguous():
        raise ValueError(f"attnkern.triton.{fn}: {name} must be a contiguous {dtype} tensor of {n} "
                         f"elements, got {t.dtype} shape {tuple(t.shape)}")


def _strides(x: Tensor) -> Tuple[int, int, int]:
    """(batch, channel, pixel) strides of a dense 4-D tensor (H and W flatten in both layouts)."""
    return x.stride(0), x.stride(1), x.stride(3)


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _tiles(C: int, HW: int, cl: bool, budget: int = 4096) -> Tuple[int, int]:
    """A [BLOCK_C, BLOCK_HW] tile of about ``budget`` elements, long along the contiguous axis."""
    if cl:
        bc = min(_np2(C), 128)
        bhw = min(_np2(HW), max(1, budget // bc))
    else:
        bhw = min(_np2(HW), 1024)
        bc = min(_np2(C), max(1, budget // bhw))
    return bc, bhw


def _dummy(x: Tensor, dtype=torch.float32) -> Tensor:
    return torch.empty(1, dtype=dtype, device=x.device)


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------

@triton.jit
def _merge_maxcnt(m, n, tm, tn):
    """Merge (max, count) with a tile's (max, count), elementwise."""
    new = tl.maximum(m, tm)
    n = tl.where(m == new, n, 0.0) + tl.where(tm == new, tn, 0.0)
    return new, n


@triton.jit
def _channel_stats_kernel(x_ptr, mean_ptr, max_ptr, cnt_ptr, C, HW, sB, sC, sHW,
                          BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cblk = tl.program_id(1)
    offs_c = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = x_ptr + b * sB + offs_c.to(tl.int64)[:, None] * sC
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    n = tl.zeros([BLOCK_C], dtype=tl.float32)
    nan = tl.zeros([BLOCK_C], dtype=tl.float32)
    for h0 in range(0, HW, BLOCK_HW):
        offs_hw = h0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < HW)[None, :]
        v = tl.load(base + offs_hw.to(tl.int64)[None, :] * sHW, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(v, axis=1)
        vm = tl.where(mask, v, float("-inf"))
        tm = tl.max(vm, axis=1)
        tn = tl.sum(tl.where((vm == tm[:, None]) & mask, 1.0, 0.0), axis=1)
        nan += tl.sum(tl.where(v != v, 1.0, 0.0), axis=1)
        m, n = _merge_maxcnt(m, n, tm, tn)
    out = b * C + offs_c
    tl.store(mean_ptr + out, acc / HW, mask=mask_c)
    tl.store(max_ptr + out, tl.where(nan > 0, float("nan"), m), mask=mask_c)
    tl.store(cnt_ptr + out, n.to(tl.int32), mask=mask_c)


@triton.jit
def _spatial_stats_kernel(x_ptr, gc_ptr, mean_ptr, max_ptr, cnt_ptr, C, HW, sB, sC, sHW,
                          BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hblk = tl.program_id(1)
    offs_hw = hblk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_hw = offs_hw < HW
    base = x_ptr + b * sB + offs_hw.to(tl.int64)[None, :] * sHW
    acc = tl.zeros([BLOCK_HW], dtype=tl.float32)
    m = tl.full([BLOCK_HW], float("-inf"), tl.float32)
    n = tl.zeros([BLOCK_HW], dtype=tl.float32)
    nan = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_hw[None, :]
        g = tl.load(gc_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        v = tl.load(base + offs_c.to(tl.int64)[:, None] * sC, mask=mask, other=0.0).to(tl.float32)
        y = v * g[:, None]
        acc += tl.sum(y, axis=0)
        ym = tl.where(mask, y, float("-inf"))
        tm = tl.max(ym, axis=0)
        tn = tl.sum(tl.where((ym == tm[None, :]) & mask, 1.0, 0.0), axis=0)
        nan += tl.sum(tl.where(y != y, 1.0, 0.0), axis=0)
        m, n = _merge_maxcnt(m, n, tm, tn)
    out = b * HW + offs_hw
    tl.store(mean_ptr + out, acc / C, mask=mask_hw)
    tl.store(max_ptr + out, tl.where(nan > 0, float("nan"), m), mask=mask_hw)
    tl.store(cnt_ptr + out, n.to(tl.int32), mask=mask_hw)


@triton.jit
def _tile(C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (offs_c < C)[:, None] & (offs_hw < HW)[None, :]
    return b, offs_c, offs_hw, mask


@triton.jit
def _gate_apply_kernel(x_ptr, out_ptr, gc_ptr, gs_ptr, C, HW, sB, sC, sHW,
                       HAS_GC: tl.constexpr, HAS_GS: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b, offs_c, offs_hw, mask = _tile(C, HW, BLOCK_C, BLOCK_HW)
    off = b * sB + offs_c.to(tl.int64)[:, None] * sC + offs_hw.to(tl.int64)[None, :] * sHW
    y = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_GC:
        y = y * tl.load(gc_ptr + b * C + offs_c, mask=offs_c < C, other=0.0)[:, None]
    if HAS_GS:
        y = y * tl.load(gs_ptr + b * HW + offs_hw, mask=offs_hw < HW, other=0.0)[None, :]
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _two_axis_kernel(d_ptr, x_ptr, wc_ptr, whw_ptr, mc_ptr, ms_ptr, part_ptr, rhw_ptr,
                     C, HW, sB, sC, sHW, NBLK,
                     MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """One read of dout and x: q = dout * x (MODE 0) or dout * x * s * (1 - s) with
    s = sigmoid(mc + ms) (MODE 1) / sigmoid(mc * ms) (MODE 2). R_hw[b, hw] = sum_c q * whw[b, c]
    is complete per program; R_c[b, c] = sum_hw q * wc[b, hw] is written as one partial per
    pixel block, summed afterwards in a fixed order."""
    b = tl.program_id(0).to(tl.int64)
    hblk = tl.program_id(1)
    offs_hw = hblk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_hw = offs_hw < HW
    wc = tl.load(wc_ptr + b * HW + offs_hw, mask=mask_hw, other=0.0)
    if MODE != 0:
        ms = tl.load(ms_ptr + b * HW + offs_hw, mask=mask_hw, other=0.0)
    rhw = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_hw[None, :]
        off = b * sB + offs_c.to(tl.int64)[:, None] * sC + offs_hw.to(tl.int64)[None, :] * sHW
        d = tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        q = d * v
        if MODE != 0:
            mc = tl.load(mc_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            if MODE == 1:
                z = mc[:, None] + ms[None, :]
            else:
                z = mc[:, None] * ms[None, :]
            s = tl.sigmoid(z)
            q = q * s * (1.0 - s)
        q = tl.where(mask, q, 0.0)
        whw = tl.load(whw_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        rhw += tl.sum(q * whw[:, None], axis=0)
        rc = tl.sum(q * wc[None, :], axis=1)
        tl.store(part_ptr + (b * NBLK + hblk) * C + offs_c, rc, mask=mask_c)
    tl.store(rhw_ptr + b * HW + offs_hw, rhw, mask=mask_hw)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, C, NBLK, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k in range(0, NBLK):
        acc += tl.load(part_ptr + (b * NBLK + k) * C + offs_c, mask=mask_c, other=0.0)
    tl.store(out_ptr + b * C + offs_c, acc, mask=mask_c)


@triton.jit
def _cbam_bwd_b_kernel(x_ptr, gc_ptr, smax_ptr, scnt_ptr, dsmean_ptr, dsmax_ptr, out_ptr,
                       C, HW, sB, sC, sHW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    g = tl.load(gc_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    base = x_ptr + b * sB + offs_c.to(tl.int64)[:, None] * sC
    for h0 in range(0, HW, BLOCK_HW):
        offs_hw = h0 + tl.arange(0, BLOCK_HW)
        mask_hw = offs_hw < HW
        mask = mask_c[:, None] & mask_hw[None, :]
        p = b * HW + offs_hw
        w1 = tl.load(dsmean_ptr + p, mask=mask_hw, other=0.0) / C
        cnt = tl.load(scnt_ptr + p, mask=mask_hw, other=1).to(tl.float32)
        w2 = tl.where(cnt > 0, tl.load(dsmax_ptr + p, mask=mask_hw, other=0.0) / tl.maximum(cnt, 1.0), 0.0)
        sm = tl.load(smax_ptr + p, mask=mask_hw, other=0.0)
        v = tl.load(base + offs_hw.to(tl.int64)[None, :] * sHW, mask=mask, other=0.0).to(tl.float32)
        y = v * g[:, None]
        t = w1[None, :] + tl.where(y == sm[None, :], w2[None, :], 0.0)
        acc += tl.sum(tl.where(mask, v * t, 0.0), axis=1)
    tl.store(out_ptr + b * C + offs_c, acc, mask=mask_c)


@triton.jit
def _gate_bwd_c_kernel(x_ptr, d_ptr, dx_ptr, gc_ptr, gs_ptr, smax_ptr, scnt_ptr, dsmean_ptr,
                       dsmax_ptr, cmax_ptr, ccnt_ptr, dcmean_ptr, dcmax_ptr,
                       C, HW, sB, sC, sHW,
                       HAS_DOUT: tl.constexpr, HAS_GC: tl.constexpr, HAS_GS: tl.constexpr,
                       HAS_SMEAN: tl.constexpr, HAS_SMAX: tl.constexpr,
                       HAS_CMEAN: tl.constexpr, HAS_CMAX: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b, offs_c, offs_hw, mask = _tile(C, HW, BLOCK_C, BLOCK_HW)
    mask_c = offs_c < C
    mask_hw = offs_hw < HW
    off = b * sB + offs_c.to(tl.int64)[:, None] * sC + offs_hw.to(tl.int64)[None, :] * sHW
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    pc = b * C + offs_c
    ph = b * HW + offs_hw
    if HAS_GC:
        g = tl.load(gc_ptr + pc, mask=mask_c, other=0.0)[:, None]
    else:
        g = tl.full([BLOCK_C, 1], 1.0, tl.float32)
    dx = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    if HAS_DOUT:
        r = tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32) * g
        if HAS_GS:
            r = r * tl.load(gs_ptr + ph, mask=mask_hw, other=0.0)[None, :]
        dx += r
    if HAS_SMEAN or HAS_SMAX:
        sp = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        if HAS_SMEAN:
            sp += (tl.load(dsmean_ptr + ph, mask=mask_hw, other=0.0) / C)[None, :]
        if HAS_SMAX:
            cnt = tl.load(scnt_ptr + ph, mask=mask_hw, other=1).to(tl.float32)
            w2 = tl.where(cnt > 0, tl.load(dsmax_ptr + ph, mask=mask_hw, other=0.0) / tl.maximum(cnt, 1.0), 0.0)
            sm = tl.load(smax_ptr + ph, mask=mask_hw, other=0.0)
            sp += tl.where(v * g == sm[None, :], w2[None, :], 0.0)
        dx += g * sp
    if HAS_CMEAN:
        dx += (tl.load(dcmean_ptr + pc, mask=mask_c, other=0.0) / HW)[:, None]
    if HAS_CMAX:
        cnt_c = tl.load(ccnt_ptr + pc, mask=mask_c, other=1).to(tl.float32)
        u2 = tl.where(cnt_c > 0, tl.load(dcmax_ptr + pc, mask=mask_c, other=0.0) / tl.maximum(cnt_c, 1.0), 0.0)
        cm = tl.load(cmax_ptr + pc, mask=mask_c, other=0.0)
        dx += tl.where(v == cm[:, None], u2[:, None], 0.0)
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bam_elementwise_kernel(x_ptr, d_ptr, out_ptr, mc_ptr, ms_ptr, dcmean_ptr, C, HW, sB, sC, sHW,
                            PRODUCT: tl.constexpr, BACKWARD: tl.constexpr, HAS_DOUT: tl.constexpr,
                            HAS_CMEAN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Forward: out = x * (1 + s). Backward: dx = dout * (1 + s) + dcmean / HW."""
    b, offs_c, offs_hw, mask = _tile(C, HW, BLOCK_C, BLOCK_HW)
    mask_c = offs_c < C
    off = b * sB + offs_c.to(tl.int64)[:, None] * sC + offs_hw.to(tl.int64)[None, :] * sHW
    out = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    if (not BACKWARD) or HAS_DOUT:
        mc = tl.load(mc_ptr + b * C + offs_c, mask=mask_c, other=0.0)[:, None]
        ms = tl.load(ms_ptr + b * HW + offs_hw, mask=offs_hw < HW, other=0.0)[None, :]
        if PRODUCT:
            s = tl.sigmoid(mc * ms)
        else:
            s = tl.sigmoid(mc + ms)
        src = d_ptr if BACKWARD else x_ptr
        out += tl.load(src + off, mask=mask, other=0.0).to(tl.float32) * (1.0 + s)
    if HAS_CMEAN:
        out += (tl.load(dcmean_ptr + b * C + offs_c, mask=mask_c, other=0.0) / HW)[:, None]
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------

def _grid3(B, C, HW, bc, bhw):
    return (B, triton.cdiv(C, bc), triton.cdiv(HW, bhw))


def channel_stats(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    B, C, HW, cl = _check_x(x, "channel_stats")
    mean = torch.empty(B, C, dtype=torch.float32, device=x.device)
    mx = torch.empty_like(mean)
    cnt = torch.empty(B, C, dtype=torch.int32, device=x.device)
    bc, bhw = _tiles(C, HW, cl)
    if not cl:
        bc = min(bc, 8)  # more programs; each streams whole channels
    _channel_stats_kernel[(B, triton.cdiv(C, bc))](x, mean, mx, cnt, C, HW, *_strides(x),
                                                   BLOCK_C=bc, BLOCK_HW=bhw)
    return mean, mx, cnt


def spatial_stats(x: Tensor, gc: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    B, C, HW, cl = _check_x(x, "spatial_stats")
    _check_small(gc, "gc", B * C, "spatial_stats")
    mean = torch.empty(B, HW, dtype=torch.float32, device=x.device)
    mx = torch.empty_like(mean)
    cnt = torch.empty(B, HW, dtype=torch.int32, device=x.device)
    bc, bhw = _tiles(C, HW, cl)
    if cl:
        bhw = min(bhw, 16)
    _spatial_stats_kernel[(B, triton.cdiv(HW, bhw))](x, gc, mean, mx, cnt, C, HW, *_strides(x),
                                                     BLOCK_C=bc, BLOCK_HW=bhw)
    return mean, mx, cnt


def gate_apply(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor]) -> Tensor:
    B, C, HW, cl = _check_x(x, "gate_apply")
    _check_small(gc, "gc", B * C, "gate_apply")
    _check_small(gs, "gs", B * HW, "gate_apply")
    out = torch.empty_like(x)
    bc, bhw = _tiles(C, HW, cl)
    _gate_apply_kernel[_grid3(B, C, HW, bc, bhw)](
        x, out, gc if gc is not None else _dummy(x), gs if gs is not None else _dummy(x),
        C, HW, *_strides(x), HAS_GC=gc is not None, HAS_GS=gs is not None, BLOCK_C=bc, BLOCK_HW=bhw)
    return out


def _two_axis(dout, x, wc, whw, mc, ms, mode, fn):
    B, C, HW, cl = _check_x(x, fn)
    _check_big(dout, "dout", x, cl, fn)
    bc, bhw = _tiles(C, HW, cl, budget=2048)
    if cl:
        bhw = min(bhw, 16)
    nblk = triton.cdiv(HW, bhw)
    part = torch.empty(B, nblk, C, dtype=torch.float32, device=x.device)
    rhw = torch.empty(B, HW, dtype=torch.float32, device=x.device)
    rc = torch.empty(B, C, dtype=torch.float32, device=x.device)
    _two_axis_kernel[(B, nblk)](dout, x, wc, whw, mc, ms, part, rhw, C, HW, *_strides(x), nblk,
                                MODE=mode, BLOCK_C=bc, BLOCK_HW=bhw)
    bcs = min(_np2(C), 256)
    _sum_partials_kernel[(B, triton.cdiv(C, bcs))](part, rc, C, nblk, BLOCK_C=bcs)
    return rc, rhw


def gate_bwd_a(dout: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
               need_dgc: bool = True, need_dgs: bool = True):
    B, C, HW, _ = _check_x(x, "gate_bwd_a")
    _check_small(gc, "gc", B * C, "gate_bwd_a")
    _check_small(gs, "gs", B * HW, "gate_bwd_a")
    ones = lambda n: torch.ones(n, dtype=torch.float32, device=x.device)  # noqa: E731
    wc = gs if gs is not None else ones(B * HW)
    whw = gc if gc is not None else ones(B * C)
    dgc, dgs = _two_axis(dout, x, wc, whw, _dummy(x), _dummy(x), 0, "gate_bwd_a")
    return (dgc if need_dgc else None), (dgs if need_dgs else None)


def cbam_bwd_b(x, gc, smax, scount, dsmean, dsmax) -> Tensor:
    B, C, HW, cl = _check_x(x, "cbam_bwd_b")
    _check_small(gc, "gc", B * C, "cbam_bwd_b")
    for t, n in ((smax, "smax"), (dsmean, "dsmean"), (dsmax, "dsmax")):
        _check_small(t, n, B * HW, "cbam_bwd_b")
    _check_small(scount, "scount", B * HW, "cbam_bwd_b", torch.int32)
    out = torch.empty(B, C, dtype=torch.float32, device=x.device)
    bc, bhw = _tiles(C, HW, cl)
    if not cl:
        bc = min(bc, 8)
    _cbam_bwd_b_kernel[(B, triton.cdiv(C, bc))](x, gc, smax, scount, dsmean, dsmax, out, C, HW,
                                               *_strides(x), BLOCK_C=bc, BLOCK_HW=bhw)
    return out


def gate_bwd_c(x, dout, gc, gs, smax=None, scount=None, dsmean=None, dsmax=None, cmax=None,
               ccount=None, dcmean=None, dcmax=None) -> Tensor:
    fn = "gate_bwd_c"
    B, C, HW, cl = _check_x(x, fn)
    if dout is not None:
        _check_big(dout, "dout", x, cl, fn)
    for t, n, k in ((gc, "gc", B * C), (gs, "gs", B * HW), (smax, "smax", B * HW),
                    (dsmean, "dsmean", B * HW), (dsmax, "dsmax", B * HW), (cmax, "cmax", B * C),
                    (dcmean, "dcmean", B * C), (dcmax, "dcmax", B * C)):
        _check_small(t, n, k, fn)
    _check_small(scount, "scount", B * HW, fn, torch.int32)
    _check_small(ccount, "ccount", B * C, fn, torch.int32)
    if dsmax is not None and (smax is None or scount is None):
        raise ValueError("attnkern.triton.gate_bwd_c: dsmax needs smax and scount")
    if dcmax is not None and (cmax is None or ccount is None):
        raise ValueError("attnkern.triton.gate_bwd_c: dcmax needs cmax and ccount")
    if (dsmean is not None or dsmax is not None) and gc is None:
        raise ValueError("attnkern.triton.gate_bwd_c: spatial terms need gc")
    d = _dummy(x)
    di = _dummy(x, torch.int32)
    dx = torch.empty_like(x)
    bc, bhw = _tiles(C, HW, cl)
    _gate_bwd_c_kernel[_grid3(B, C, HW, bc, bhw)](
        x, dout if dout is not None else x, dx, gc if gc is not None else d, gs if gs is not None else d,
        smax if smax is not None else d, scount if scount is not None else di,
        dsmean if dsmean is not None else d, dsmax if dsmax is not None else d,
        cmax if cmax is not None else d, ccount if ccount is not None else di,
        dcmean if dcmean is not None else d, dcmax if dcmax is not None else d,
        C, HW, *_strides(x),
        HAS_DOUT=dout is not None, HAS_GC=gc is not None, HAS_GS=gs is not None,
        HAS_SMEAN=dsmean is not None, HAS_SMAX=dsmax is not None,
        HAS_CMEAN=dcmean is not None, HAS_CMAX=dcmax is not None,
        BLOCK_C=bc, BLOCK_HW=bhw)
    return dx


def _check_bam(x, mc, ms, fn):
    B, C, HW, cl = _check_x(x, fn)
    _check_small(mc, "mc", B * C, fn)
    _check_small(ms, "ms", B * HW, fn)
    return B, C, HW, cl


def bam_combine(x: Tensor, mc: Tensor, ms: Tensor, product: bool) -> Tensor:
    B, C, HW, cl = _check_bam(x, mc, ms, "bam_combine")
    out = torch.empty_like(x)
    bc, bhw = _tiles(C, HW, cl)
    _bam_elementwise_kernel[_grid3(B, C, HW, bc, bhw)](
        x, x, out, mc, ms, _dummy(x), C, HW, *_strides(x), PRODUCT=bool(product), BACKWARD=False,
        HAS_DOUT=False, HAS_CMEAN=False, BLOCK_C=bc, BLOCK_HW=bhw)
    return out


def bam_combine_bwd(dout: Tensor, x: Tensor, mc: Tensor, ms: Tensor, product: bool):
    B, C, HW, _ = _check_bam(x, mc, ms, "bam_combine_bwd")
    ones = lambda n: torch.ones(n, dtype=torch.float32, device=x.device)  # noqa: E731
    wc = ms if product else ones(B * HW)
    whw = mc if product else ones(B * C)
    return _two_axis(dout, x, wc, whw, mc, ms, 2 if product else 1, "bam_combine_bwd")


def bam_dx(x: Tensor, dout: Optional[Tensor], mc: Tensor, ms: Tensor, product: bool,
           dcmean: Optional[Tensor]) -> Tensor:
    B, C, HW, cl = _check_bam(x, mc, ms, "bam_dx")
    if dout is not None:
        _check_big(dout, "dout", x, cl, "bam_dx")
    _check_small(dcmean, "dcmean", B * C, "bam_dx")
    dx = torch.empty_like(x)
    bc, bhw = _tiles(C, HW, cl)
    _bam_elementwise_kernel[_grid3(B, C, HW, bc, bhw)](
        x, dout if dout is not None else x, dx, mc, ms, dcmean if dcmean is not None else _dummy(x),
        C, HW, *_strides(x), PRODUCT=bool(product), BACKWARD=True, HAS_DOUT=dout is not None,
        HAS_CMEAN=dcmean is not None, BLOCK_C=bc, BLOCK_HW=bhw)
    return dx
