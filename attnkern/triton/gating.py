"""Triton kernels of the pooled-gating primitives shared by CBAM, SE and BAM.

Same functions, argument orders and results as :mod:`attnkern.reference.gating` (the ground
truth) and the C++ backend:

=========================  =================================================================
``channel_stats``      mean, max and tie count of x over H*W (one read of x)
``spatial_stats``      mean, max and tie count over C of x*gc (one read)
``gate_apply``         x*gc*gs (one read, one write)
``gate_apply_backward``     gate gradients: sums of grad_out*x over both axes (one read of
                          grad_out and x)
``spatial_stats_backward``  channel-gate gradient through the spatial statistics (one read of x)
``gating_input_grad``     the input gradient of a gating block, every term optional (one write)
``bam_combine``           x*(1 + sigmoid(z)), z = mc + ms or mc * ms
``bam_combine_backward``  the logit gradients of the combine (one read of grad_out and x)
``bam_input_grad``        the input gradient of the combine plus a channel-mean term
=========================  =================================================================

Design (for bandwidth on H100/H200-class GPUs; checked on CPU under ``TRITON_INTERPRET=1``):

- **Layouts without copies.** x is read as ``[B, C, HW]`` through its strides, so NCHW- and
  channels_last-contiguous tensors are both taken as they are. A program works on
  ``[BLOCK_C, BLOCK_HW]`` tiles shaped by the layout: long along HW for NCHW, long along C for
  channels_last, so every load is coalesced along the contiguous dimension.
- **Accumulation dtype.** float64 for float64 input, float32 otherwise: x is loaded, upcast,
  and everything after that (gates, products, sums, maxima) is in that dtype. Gates,
  statistics and their gradients are contiguous tensors of the accumulation dtype, counts int32.
  Inputs taken: ``SUPPORTED_DTYPES`` (float32, bfloat16, float16, float64).
- **Reductions without atomics.** A reduction over C runs inside one program (C is at most a
  few thousand). A reduction over H*W, which may span a 112x112 or larger map, is split in
  fixed ranges of pixel tiles: each program writes its partial result and a second small kernel
  combines the partials in a fixed order. Tile sizes and split counts depend on the shapes only
  (not on timing: no autotuning, whose choice of tiles would change the summation order from one
  process to the next), so two runs give bitwise-equal results.
- **Both axes from one read.** ``gate_apply_backward`` and ``bam_combine_backward`` reduce ``grad_out*x`` over C
  and over H*W in the same pass: the sum along the axis a program loops over is kept in
  registers, the other is written as one partial per tile and combined afterwards.
- **Max with tie count** follows ``torch.amax``'s gradient: per row the max and the number of
  elements equal to it; (max, count) pairs of tiles and of splits merge exactly. A NaN in a
  reduced row makes its max NaN (as ``torch.amax``). The max masks of the backward passes
  recompute ``x*gc`` exactly as ``spatial_stats`` does, so they select the same elements.
- **64-bit offsets**: batch, channel and pixel indices are widened to int64 before they meet a
  stride, so tensors over 2^31 elements are addressed correctly. Ragged edges (any C, H, W) are
  masked. Grids are one-dimensional (no 65535 limit on the second and third grid axes).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import device_guard as _device_guard
from ._launch import interpret as _interpret

__all__ = [
    "SUPPORTED_DTYPES", "channel_stats", "spatial_stats", "spatial_stats_backward", "gate_apply",
    "gate_apply_backward", "gating_input_grad", "bam_combine", "bam_combine_backward", "bam_input_grad",
]

#: Input dtypes the kernels take (x and dout); the ops layer sends any other to the reference.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Tiling. A tile holds about _TILE elements. NCHW tiles run up to _MAX_BLOCK_HW pixels along a
# row; channels_last tiles up to _MAX_BLOCK_C channels. Kernels that loop over C shrink their
# pixel block (not below _MIN_BLOCK_HW for NCHW, to keep loads coalesced, nor below
# _MIN_PROGRAM_ELEMS elements of work per program) until there are about _TARGET_PROGRAMS
# programs, enough to fill the 132 SMs of an H100 several times. Reductions over H*W are split
# into ranges of at least _MIN_TILES_PER_SPLIT tiles with the same target.
_TILE = 4096
_MAX_BLOCK_HW = 1024
_MIN_BLOCK_HW = 128
_MAX_BLOCK_C = 128
_MIN_BLOCK_HW_CL = 4
_TARGET_PROGRAMS = 1024
_MIN_PROGRAM_ELEMS = 4096
_MIN_TILES_PER_SPLIT = 4
# gate_bwd_a / bam_combine_bwd loop over pixels (writing one partial of the channel sum per
# channel block) when a tile spans at least this many channels, else over channels.
_MIN_BLOCK_C_FOR_HW_LOOP = 32
_MAX_BLOCK_COMBINE = 1024


# ------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------

class _Layout(NamedTuple):
    """x seen as [B, C, HW]: sizes, element strides and whether it is channels_last."""

    B: int
    C: int
    HW: int
    cl: bool
    sB: int
    sC: int
    sHW: int
    acc: torch.dtype


def _err(fn: str, msg: str) -> str:
    return f"attnkern.triton.gating.{fn}: {msg}"


def _check_x(x: Tensor, fn: str) -> _Layout:
    if not isinstance(x, Tensor):
        raise TypeError(_err(fn, f"x must be a torch.Tensor, got {type(x).__name__}"))
    if x.dim() != 4:
        raise ValueError(_err(fn, f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}"))
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(_err(fn, f"x must have dtype {names}; got {x.dtype}"))
    if x.numel() == 0:
        raise ValueError(_err(fn, f"x must not be empty, got shape {tuple(x.shape)}"))
    if not x.is_cuda and not (x.device.type == "cpu" and _interpret()):
        raise ValueError(_err(fn, f"x must be a CUDA tensor (CPU tensors only under "
                                  f"TRITON_INTERPRET=1), got device {x.device}"))
    if x.is_contiguous():
        cl = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        cl = True
    else:
        raise ValueError(_err(fn, f"x must be NCHW-contiguous or channels_last-contiguous, got "
                                  f"shape {tuple(x.shape)} with strides {x.stride()}"))
    B, C, H, W = x.shape
    if C >= 2**31 or H * W >= 2**31:
        raise ValueError(_err(fn, f"C and H*W must each be below 2**31, got shape {tuple(x.shape)}"))
    # H and W flatten into one pixel index in both layouts. The stride of a size-1 dimension is
    # arbitrary (contiguity ignores it), so the pixel stride is W's unless W == 1.
    s_hw = x.stride(3) if W > 1 else x.stride(2)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _Layout(B, C, H * W, cl, x.stride(0), x.stride(1), s_hw, acc)


def _check_big(t: Tensor, name: str, x: Tensor, L: _Layout, fn: str) -> None:
    """A second big tensor (dout): x's shape, dtype, device and memory format."""
    if not isinstance(t, Tensor):
        raise TypeError(_err(fn, f"{name} must be a torch.Tensor, got {type(t).__name__}"))
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(_err(fn, f"{name} must have x's shape {tuple(x.shape)}, dtype {x.dtype} and "
                                  f"device {x.device}; got {tuple(t.shape)}, {t.dtype}, {t.device}"))
    fmt = torch.channels_last if L.cl else torch.contiguous_format
    if not t.is_contiguous(memory_format=fmt):
        layout = "channels_last" if L.cl else "NCHW"
        raise ValueError(_err(fn, f"{name} must be {layout}-contiguous like x, got strides {t.stride()}"))


def _check_small(t: Optional[Tensor], name: str, n: int, x: Tensor, fn: str,
                 dtype: torch.dtype) -> None:
    """A gate, statistic or gradient: ``n`` contiguous elements of ``dtype`` on x's device."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(_err(fn, f"{name} must be a torch.Tensor or None, got {type(t).__name__}"))
    if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device != x.device:
        raise ValueError(_err(fn, f"{name} must be a contiguous {dtype} tensor of {n} elements on "
                                  f"{x.device}; got {t.dtype}, shape {tuple(t.shape)}, "
                                  f"contiguous={t.is_contiguous()}, device {t.device}"))


def _tl_acc(L: _Layout):
    return tl.float64 if L.acc == torch.float64 else tl.float32


def _placeholder(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A one-element tensor passed for an absent optional argument (never read)."""
    return torch.empty(1, dtype=dtype, device=x.device)


# ------------------------------------------------------------------------------------------
# tiling plans (shape-only, hence reproducible)
# ------------------------------------------------------------------------------------------

def _np2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _num_warps(block_c: int, block_hw: int) -> int:
    return 8 if block_c * block_hw >= 4096 else 4


def _stream_tile(L: _Layout) -> Tuple[int, int]:
    """The tile of element-wise kernels and of kernels that loop over pixels."""
    if L.cl:
        bc = min(_np2(L.C), _MAX_BLOCK_C)
        bhw = min(_np2(L.HW), max(1, _TILE // bc))
    else:
        bhw = min(_np2(L.HW), _MAX_BLOCK_HW)
        bc = min(_np2(L.C), max(1, _TILE // bhw))
    return bc, bhw


def _c_loop_tile(L: _Layout) -> Tuple[int, int]:
    """The tile of kernels with one program per (batch, pixel block) looping over C: the pixel
    block shrinks until B * HW / BLOCK_HW reaches about _TARGET_PROGRAMS, but a program keeps
    at least about _MIN_PROGRAM_ELEMS elements of work (C * BLOCK_HW)."""
    want = max(_np2(triton.cdiv(L.B * L.HW, _TARGET_PROGRAMS)), _np2(triton.cdiv(_MIN_PROGRAM_ELEMS, L.C)))
    if L.cl:
        bc = min(_np2(L.C), _MAX_BLOCK_C)
        bhw = min(_np2(L.HW), max(1, _TILE // bc), max(want, _MIN_BLOCK_HW_CL))
    else:
        bhw = min(_np2(L.HW), _MAX_BLOCK_HW, max(want, _MIN_BLOCK_HW))
        bc = min(_np2(L.C), max(1, _TILE // bhw))
    return bc, bhw


class _SplitPlan(NamedTuple):
    """A reduction over pixels: tiles of [block_c, block_hw], ``ncb`` channel blocks, the pixel
    tiles cut into ``nsplit`` ranges of ``tps`` tiles, one program per (b, channel block, range)."""

    block_c: int
    block_hw: int
    ncb: int
    nsplit: int
    tps: int

    @property
    def grid(self):
        return self.ncb * self.nsplit


def _split_plan(L: _Layout) -> _SplitPlan:
    bc, bhw = _stream_tile(L)
    ncb = triton.cdiv(L.C, bc)
    ntiles = triton.cdiv(L.HW, bhw)
    nsplit = max(1, min(triton.cdiv(_TARGET_PROGRAMS, L.B * ncb), triton.cdiv(ntiles, _MIN_TILES_PER_SPLIT)))
    tps = triton.cdiv(ntiles, nsplit)
    nsplit = triton.cdiv(ntiles, tps)  # no empty range
    return _SplitPlan(bc, bhw, ncb, nsplit, tps)


# ------------------------------------------------------------------------------------------
# kernels: shared pieces
# ------------------------------------------------------------------------------------------

@triton.jit
def _merge_max_count(m, n, tm, tn):
    """Merge running (max, count) pairs with a tile's pairs, elementwise; exact."""
    new = tl.maximum(m, tm)
    n = tl.where(m == new, n, 0) + tl.where(tm == new, tn, 0)
    return new, n


@triton.jit
def _split_coords(NCB, NSPLIT):
    """Program id -> (batch, channel block, pixel range); ranges of one row are adjacent."""
    pid = tl.program_id(0)
    s = pid % NSPLIT
    t = pid // NSPLIT
    return (t // NCB).to(tl.int64), t % NCB, s


@triton.jit
def _tile_coords(NCB, NHB, CL: tl.constexpr):
    """Program id -> (batch, channel block, pixel block), walking the contiguous axis first."""
    pid = tl.program_id(0)
    if CL:
        cb = pid % NCB
        t = pid // NCB
        hb = t % NHB
        b = t // NHB
    else:
        hb = pid % NHB
        t = pid // NHB
        cb = t % NCB
        b = t // NCB
    return b.to(tl.int64), cb, hb


@triton.jit
def _bam_sigmoid(mc, ms, PRODUCT: tl.constexpr):
    """s = sigmoid(z) with z = mc * ms (product) or mc + ms, broadcast [BLOCK_C, 1] x [1, BLOCK_HW]."""
    if PRODUCT:
        z = mc * ms
    else:
        z = mc + ms
    return tl.sigmoid(z)


# ------------------------------------------------------------------------------------------
# kernels: statistics
# ------------------------------------------------------------------------------------------

@triton.jit
def _channel_stats_kernel(x_ptr, sum_ptr, max_ptr, cnt_ptr, C, HW, sB, sC, sHW, NCB, NSPLIT, TPS,
                          FINAL: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Sum, max and tie count over one range of pixels for BLOCK_C channels. Writes partials
    [B, NSPLIT, C], or (FINAL, NSPLIT == 1) the mean and the result directly."""
    b, cb, s = _split_coords(NCB, NSPLIT)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    rows = x_ptr + b * sB + offs_c.to(tl.int64)[:, None] * sC
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    mx = tl.full([BLOCK_C], float("-inf"), ACC)
    cnt = tl.zeros([BLOCK_C], dtype=tl.int32)
    nan = tl.zeros([BLOCK_C], dtype=tl.int32)
    hw_lo = s * (TPS * BLOCK_HW)
    hw_hi = tl.minimum(hw_lo + TPS * BLOCK_HW, HW)
    for h0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs_hw = h0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < HW)[None, :]
        v = tl.load(rows + offs_hw.to(tl.int64)[None, :] * sHW, mask=mask, other=0.0).to(ACC)
        acc += tl.sum(v, axis=1)
        vm = tl.where(mask, v, float("-inf"))
        tmax = tl.max(vm, axis=1)
        tcnt = tl.sum((mask & (vm == tmax[:, None])).to(tl.int32), axis=1)
        nan = tl.maximum(nan, tl.max((v != v).to(tl.int32), axis=1))
        mx, cnt = _merge_max_count(mx, cnt, tmax, tcnt)
    mx = tl.where(nan > 0, float("nan"), mx)
    cnt = tl.where(nan > 0, 0, cnt)  # no element equals a NaN max (the reference's count)
    out = (b * NSPLIT + s) * C + offs_c
    if FINAL:
        acc = acc / HW
    tl.store(sum_ptr + out, acc, mask=mask_c)
    tl.store(max_ptr + out, mx, mask=mask_c)
    tl.store(cnt_ptr + out, cnt, mask=mask_c)


@triton.jit
def _merge_stats_kernel(psum_ptr, pmax_ptr, pcnt_ptr, mean_ptr, max_ptr, cnt_ptr, N, HW, NSPLIT,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Combine [B, NSPLIT, N] partial (sum, max, count) in split order into mean, max, count."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(N, BLOCK)
    b = (pid // nblk).to(tl.int64)
    offs = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=ACC)
    mx = tl.full([BLOCK], float("-inf"), ACC)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(0, NSPLIT):
        p = (b * NSPLIT + s) * N + offs
        acc += tl.load(psum_ptr + p, mask=mask, other=0.0)
        pm = tl.load(pmax_ptr + p, mask=mask, other=float("-inf"))
        pc = tl.load(pcnt_ptr + p, mask=mask, other=0)
        nan = tl.maximum(nan, (pm != pm).to(tl.int32))
        mx, cnt = _merge_max_count(mx, cnt, pm, pc)
    out = b * N + offs
    tl.store(mean_ptr + out, acc / HW, mask=mask)
    tl.store(max_ptr + out, tl.where(nan > 0, float("nan"), mx), mask=mask)
    tl.store(cnt_ptr + out, tl.where(nan > 0, 0, cnt), mask=mask)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, N, NSPLIT, BLOCK: tl.constexpr):
    """out[b, n] = sum over s, in order, of part[b, s, n]."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(N, BLOCK)
    b = (pid // nblk).to(tl.int64)
    offs = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for s in range(0, NSPLIT):
        acc += tl.load(part_ptr + (b * NSPLIT + s) * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + b * N + offs, acc, mask=mask)


@triton.jit
def _spatial_stats_kernel(x_ptr, gc_ptr, mean_ptr, max_ptr, cnt_ptr, C, HW, sB, sC, sHW, NHB,
                          ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Mean, max and tie count over C of y = x * gc for one block of pixels."""
    pid = tl.program_id(0)
    b = (pid // NHB).to(tl.int64)
    offs_hw = (pid % NHB) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_hw = offs_hw < HW
    cols = x_ptr + b * sB + offs_hw.to(tl.int64)[None, :] * sHW
    acc = tl.zeros([BLOCK_HW], dtype=ACC)
    mx = tl.full([BLOCK_HW], float("-inf"), ACC)
    cnt = tl.zeros([BLOCK_HW], dtype=tl.int32)
    nan = tl.zeros([BLOCK_HW], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_hw[None, :]
        g = tl.load(gc_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        v = tl.load(cols + offs_c.to(tl.int64)[:, None] * sC, mask=mask, other=0.0).to(ACC)
        y = v * g[:, None]
        acc += tl.sum(y, axis=0)
        ym = tl.where(mask, y, float("-inf"))
        tmax = tl.max(ym, axis=0)
        tcnt = tl.sum((mask & (ym == tmax[None, :])).to(tl.int32), axis=0)
        nan = tl.maximum(nan, tl.max((y != y).to(tl.int32), axis=0))
        mx, cnt = _merge_max_count(mx, cnt, tmax, tcnt)
    out = b * HW + offs_hw
    tl.store(mean_ptr + out, acc / C, mask=mask_hw)
    tl.store(max_ptr + out, tl.where(nan > 0, float("nan"), mx), mask=mask_hw)
    tl.store(cnt_ptr + out, tl.where(nan > 0, 0, cnt), mask=mask_hw)


# ------------------------------------------------------------------------------------------
# kernels: gradients
# ------------------------------------------------------------------------------------------

@triton.jit
def _dz_tile(d_ptr, x_ptr, off, mask, wc, whw, BAM: tl.constexpr, ACC: tl.constexpr):
    """q = dout * x (BAM == 0), or dout * x * s * (1 - s) with s = sigmoid(z) and z = wc + whw
    (BAM == 1) or wc * whw (BAM == 2), for one tile; zero outside the mask."""
    q = tl.load(d_ptr + off, mask=mask, other=0.0).to(ACC) * tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    if BAM != 0:
        s = _bam_sigmoid(wc[:, None], whw[None, :], BAM == 2)
        q = q * s * (1.0 - s)
    return q


@triton.jit
def _two_axis_kernel(d_ptr, x_ptr, wc_ptr, whw_ptr, pc_ptr, phw_ptr, C, HW, sB, sC, sHW,
                     NCB, NSPLIT, TPS,
                     BAM: tl.constexpr, LOAD_C: tl.constexpr, LOAD_HW: tl.constexpr,
                     WEIGHT_C: tl.constexpr, WEIGHT_HW: tl.constexpr,
                     NEED_C: tl.constexpr, NEED_HW: tl.constexpr, LOOP_C: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """From one read of dout and x, with q from ``_dz_tile``:

    R_c[b, c]   = sum_hw q * whw[b, hw]  (whw only if WEIGHT_HW)  -> pc partials [B, *, C]
    R_hw[b, hw] = sum_c  q * wc[b, c]    (wc only if WEIGHT_C)    -> phw partials [B, *, HW]

    LOOP_C: one program per (b, pixel block) loops over all of C; R_hw is complete (phw has one
    partial), R_c is written per pixel block (NSPLIT = number of pixel blocks).
    Otherwise: one program per (b, channel block, pixel range) loops over its pixel tiles; R_c is
    written per range (NSPLIT ranges), R_hw per channel block (NCB partials).
    """
    # wc / whw stay 0.0 (never read) when their tensor is absent.
    if LOOP_C:
        pid = tl.program_id(0)
        b = (pid // NSPLIT).to(tl.int64)
        hb = pid % NSPLIT
        offs_hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask_hw = offs_hw < HW
        if LOAD_HW:
            whw = tl.load(whw_ptr + b * HW + offs_hw, mask=mask_hw, other=0.0)
        else:
            whw = 0.0
        cols = b * sB + offs_hw.to(tl.int64)[None, :] * sHW
        r_hw = tl.zeros([BLOCK_HW], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            if LOAD_C:
                wc = tl.load(wc_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            else:
                wc = 0.0
            mask = mask_c[:, None] & mask_hw[None, :]
            q = _dz_tile(d_ptr, x_ptr, cols + offs_c.to(tl.int64)[:, None] * sC, mask, wc, whw, BAM, ACC)
            if NEED_HW:
                if WEIGHT_C:
                    r_hw += tl.sum(q * wc[:, None], axis=0)
                else:
                    r_hw += tl.sum(q, axis=0)
            if NEED_C:
                if WEIGHT_HW:
                    r_c = tl.sum(q * whw[None, :], axis=1)
                else:
                    r_c = tl.sum(q, axis=1)
                tl.store(pc_ptr + (b * NSPLIT + hb) * C + offs_c, r_c, mask=mask_c)
        if NEED_HW:
            tl.store(phw_ptr + b * HW + offs_hw, r_hw, mask=mask_hw)
    else:
        b, cb, s = _split_coords(NCB, NSPLIT)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if LOAD_C:
            wc = tl.load(wc_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        else:
            wc = 0.0
        rows = b * sB + offs_c.to(tl.int64)[:, None] * sC
        r_c = tl.zeros([BLOCK_C], dtype=ACC)
        hw_lo = s * (TPS * BLOCK_HW)
        hw_hi = tl.minimum(hw_lo + TPS * BLOCK_HW, HW)
        for h0 in range(hw_lo, hw_hi, BLOCK_HW):
            offs_hw = h0 + tl.arange(0, BLOCK_HW)
            mask_hw = offs_hw < HW
            if LOAD_HW:
                whw = tl.load(whw_ptr + b * HW + offs_hw, mask=mask_hw, other=0.0)
            else:
                whw = 0.0
            mask = mask_c[:, None] & mask_hw[None, :]
            q = _dz_tile(d_ptr, x_ptr, rows + offs_hw.to(tl.int64)[None, :] * sHW, mask, wc, whw, BAM, ACC)
            if NEED_C:
                if WEIGHT_HW:
                    r_c += tl.sum(q * whw[None, :], axis=1)
                else:
                    r_c += tl.sum(q, axis=1)
            if NEED_HW:
                if WEIGHT_C:
                    r_hw = tl.sum(q * wc[:, None], axis=0)
                else:
                    r_hw = tl.sum(q, axis=0)
                tl.store(phw_ptr + (b * NCB + cb) * HW + offs_hw, r_hw, mask=mask_hw)
        if NEED_C:
            tl.store(pc_ptr + (b * NSPLIT + s) * C + offs_c, r_c, mask=mask_c)


@triton.jit
def _spatial_stats_backward_kernel(x_ptr, gc_ptr, smax_ptr, scnt_ptr, dsmean_ptr, dsmax_ptr, part_ptr,
                       C, HW, sB, sC, sHW, NCB, NSPLIT, TPS,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Partial over one pixel range of sum_hw x * (dsmean / C + dsmax * [x*gc == smax] / scount)."""
    b, cb, s = _split_coords(NCB, NSPLIT)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    g = tl.load(gc_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    rows = x_ptr + b * sB + offs_c.to(tl.int64)[:, None] * sC
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    hw_lo = s * (TPS * BLOCK_HW)
    hw_hi = tl.minimum(hw_lo + TPS * BLOCK_HW, HW)
    for h0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs_hw = h0 + tl.arange(0, BLOCK_HW)
        mask_hw = offs_hw < HW
        mask = mask_c[:, None] & mask_hw[None, :]
        p = b * HW + offs_hw
        w_mean = tl.load(dsmean_ptr + p, mask=mask_hw, other=0.0) / C
        inv_cnt = 1.0 / tl.load(scnt_ptr + p, mask=mask_hw, other=1).to(ACC)
        dsmax = tl.load(dsmax_ptr + p, mask=mask_hw, other=0.0)
        smax = tl.load(smax_ptr + p, mask=mask_hw, other=0.0)
        v = tl.load(rows + offs_hw.to(tl.int64)[None, :] * sHW, mask=mask, other=0.0).to(ACC)
        sel = tl.where(v * g[:, None] == smax[None, :], 1.0, 0.0).to(ACC)
        w = w_mean[None, :] + dsmax[None, :] * (sel * inv_cnt[None, :])
        acc += tl.sum(tl.where(mask, v * w, 0.0), axis=1)
    tl.store(part_ptr + (b * NSPLIT + s) * C + offs_c, acc, mask=mask_c)


# ------------------------------------------------------------------------------------------
# kernels: element-wise passes
# ------------------------------------------------------------------------------------------

@triton.jit
def _gate_apply_kernel(x_ptr, out_ptr, gc_ptr, gs_ptr, C, HW, sB, sC, sHW, NCB, NHB,
                       HAS_GC: tl.constexpr, HAS_GS: tl.constexpr, CL: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """out = (x * gc) * gs for one tile, each gate optional."""
    b, cb, hb = _tile_coords(NCB, NHB, CL)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_c = offs_c < C
    mask_hw = offs_hw < HW
    mask = mask_c[:, None] & mask_hw[None, :]
    off = b * sB + offs_c.to(tl.int64)[:, None] * sC + offs_hw.to(tl.int64)[None, :] * sHW
    y = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    if HAS_GC:
        y = y * tl.load(gc_ptr + b * C + offs_c, mask=mask_c, other=0.0)[:, None]
    if HAS_GS:
        y = y * tl.load(gs_ptr + b * HW + offs_hw, mask=mask_hw, other=0.0)[None, :]
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


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


@triton.jit
def _bam_elementwise_kernel(src_ptr, out_ptr, mc_ptr, ms_ptr, dcmean_ptr, C, HW, sB, sC, sHW, NCB, NHB,
                            PRODUCT: tl.constexpr, HAS_SRC: tl.constexpr, HAS_CMEAN: tl.constexpr,
                            CL: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """out = src * (1 + sigmoid(z)) + dcmean / HW for one tile (src = x in the forward pass,
    dout in the backward pass); each term optional."""
    b, cb, hb = _tile_coords(NCB, NHB, CL)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_c = offs_c < C
    mask_hw = offs_hw < HW
    mask = mask_c[:, None] & mask_hw[None, :]
    off = b * sB + offs_c.to(tl.int64)[:, None] * sC + offs_hw.to(tl.int64)[None, :] * sHW
    out = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    if HAS_SRC:
        mc = tl.load(mc_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        ms = tl.load(ms_ptr + b * HW + offs_hw, mask=mask_hw, other=0.0)
        s = _bam_sigmoid(mc[:, None], ms[None, :], PRODUCT)
        out += tl.load(src_ptr + off, mask=mask, other=0.0).to(ACC) * (1.0 + s)
    if HAS_CMEAN:
        out += (tl.load(dcmean_ptr + b * C + offs_c, mask=mask_c, other=0.0) / HW)[:, None]
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------

def _combine_sums(part: Tensor, B: int, N: int) -> Tensor:
    """[B, S, N] partials -> [B, N] sums in split order (a view when S == 1)."""
    nsplit = part.shape[1]
    if nsplit == 1:
        return part.view(B, N)
    out = torch.empty(B, N, dtype=part.dtype, device=part.device)
    block = min(_np2(N), _MAX_BLOCK_COMBINE)
    _sum_splits_kernel[(B * triton.cdiv(N, block),)](part, out, N, nsplit, BLOCK=block)
    return out


def _launch_elementwise(kernel, L: _Layout, *args, **meta) -> None:
    bc, bhw = _stream_tile(L)
    ncb, nhb = triton.cdiv(L.C, bc), triton.cdiv(L.HW, bhw)
    kernel[(L.B * ncb * nhb,)](*args, L.C, L.HW, L.sB, L.sC, L.sHW, ncb, nhb, **meta, CL=L.cl,
                                ACC=_tl_acc(L), BLOCK_C=bc, BLOCK_HW=bhw,
                                num_warps=_num_warps(bc, bhw))


def _two_axis(dout: Tensor, x: Tensor, L: _Layout, wc: Optional[Tensor],
              whw: Optional[Tensor], bam: int, weight_c: bool, weight_hw: bool,
              need_c: bool, need_hw: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Sums over HW (-> [B, C]) and over C (-> [B, HW]) of q = dout * x [* s * (1 - s)], the
    first weighted by whw and the second by wc where asked; see ``_two_axis_kernel``."""
    if not (need_c or need_hw):
        return None, None
    B, C, HW = L.B, L.C, L.HW
    plan = _split_plan(L)
    loop_c = need_hw and plan.block_c < _MIN_BLOCK_C_FOR_HW_LOOP
    if loop_c:
        bc, bhw = _c_loop_tile(L)
        ncb, nsplit, tps = 1, triton.cdiv(HW, bhw), 1
        grid = B * nsplit
    else:
        bc, bhw, ncb, nsplit, tps = plan
        grid = B * plan.grid
    pc = torch.empty(B, nsplit if need_c else 1, C, dtype=L.acc, device=x.device)
    phw = torch.empty(B, ncb if need_hw else 1, HW, dtype=L.acc, device=x.device)
    wc_t = wc if wc is not None else _placeholder(x, L.acc)
    whw_t = whw if whw is not None else _placeholder(x, L.acc)
    with _device_guard(x):
        _two_axis_kernel[(grid,)](
            dout, x, wc_t, whw_t, pc, phw, C, HW, L.sB, L.sC, L.sHW, ncb, nsplit, tps,
            BAM=bam, LOAD_C=wc is not None, LOAD_HW=whw is not None,
            WEIGHT_C=weight_c, WEIGHT_HW=weight_hw, NEED_C=need_c, NEED_HW=need_hw,
            LOOP_C=loop_c, ACC=_tl_acc(L), BLOCK_C=bc, BLOCK_HW=bhw, num_warps=_num_warps(bc, bhw))
        r_c = _combine_sums(pc, B, C) if need_c else None
        r_hw = _combine_sums(phw, B, HW) if need_hw else None
    return r_c, r_hw


# ------------------------------------------------------------------------------------------
# the primitives
# ------------------------------------------------------------------------------------------

def channel_stats(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, max and tie count of x over H*W per (b, c): [B, C] each (count int32)."""
    L = _check_x(x, "channel_stats")
    B, C = L.B, L.C
    mean = torch.empty(B, C, dtype=L.acc, device=x.device)
    mx = torch.empty_like(mean)
    cnt = torch.empty(B, C, dtype=torch.int32, device=x.device)
    plan = _split_plan(L)
    final = plan.nsplit == 1
    if final:
        psum, pmax, pcnt = mean, mx, cnt
    else:
        psum = torch.empty(B, plan.nsplit, C, dtype=L.acc, device=x.device)
        pmax = torch.empty_like(psum)
        pcnt = torch.empty(B, plan.nsplit, C, dtype=torch.int32, device=x.device)
    with _device_guard(x):
        _channel_stats_kernel[(B * plan.grid,)](
            x, psum, pmax, pcnt, C, L.HW, L.sB, L.sC, L.sHW, plan.ncb, plan.nsplit, plan.tps,
            FINAL=final, ACC=_tl_acc(L), BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
            num_warps=_num_warps(plan.block_c, plan.block_hw))
        if not final:
            block = min(_np2(C), _MAX_BLOCK_COMBINE)
            _merge_stats_kernel[(B * triton.cdiv(C, block),)](
                psum, pmax, pcnt, mean, mx, cnt, C, L.HW, plan.nsplit, ACC=_tl_acc(L), BLOCK=block)
    return mean, mx, cnt


def spatial_stats(x: Tensor, gc: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, max and tie count over C of x * gc per (b, hw): [B, H*W] each (count int32)."""
    L = _check_x(x, "spatial_stats")
    if gc is None:
        raise ValueError(_err("spatial_stats", "gc is required"))
    _check_small(gc, "gc", L.B * L.C, x, "spatial_stats", L.acc)
    B, HW = L.B, L.HW
    mean = torch.empty(B, HW, dtype=L.acc, device=x.device)
    mx = torch.empty_like(mean)
    cnt = torch.empty(B, HW, dtype=torch.int32, device=x.device)
    bc, bhw = _c_loop_tile(L)
    nhb = triton.cdiv(HW, bhw)
    with _device_guard(x):
        _spatial_stats_kernel[(B * nhb,)](x, gc, mean, mx, cnt, L.C, HW, L.sB, L.sC, L.sHW, nhb,
                                          ACC=_tl_acc(L), BLOCK_C=bc, BLOCK_HW=bhw,
                                          num_warps=_num_warps(bc, bhw))
    return mean, mx, cnt


def gate_apply(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor]) -> Tensor:
    """``(x * gc[b, c]) * gs[b, hw]``, each gate optional; x's dtype and memory format."""
    fn = "gate_apply"
    L = _check_x(x, fn)
    _check_small(gc, "gc", L.B * L.C, x, fn, L.acc)
    _check_small(gs, "gs", L.B * L.HW, x, fn, L.acc)
    out = torch.empty_like(x)
    ph = _placeholder(x, L.acc)
    with _device_guard(x):
        _launch_elementwise(_gate_apply_kernel, L, x, out, gc if gc is not None else ph,
                            gs if gs is not None else ph, HAS_GC=gc is not None, HAS_GS=gs is not None)
    return out


def gate_apply_backward(grad_out: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
                        need_grad_gc: bool = True, need_grad_gs: bool = True) -> Tuple[Tensor, Tensor]:
    """Gate gradients of ``out = x * gc * gs`` from one read of grad_out and x:
    grad_gc = sum_hw grad_out * x * gs, grad_gs = sum_c grad_out * x * gc (a missing gate counts
    as 1); a gradient not asked for is an empty tensor."""
    fn = "gate_apply_backward"
    L = _check_x(x, fn)
    _check_big(grad_out, "grad_out", x, L, fn)
    _check_small(gc, "gc", L.B * L.C, x, fn, L.acc)
    _check_small(gs, "gs", L.B * L.HW, x, fn, L.acc)
    need_grad_gs = bool(need_grad_gs)
    need_grad_gc = bool(need_grad_gc)
    grad_gc, grad_gs = _two_axis(grad_out, x, L, wc=gc if need_grad_gs else None,
                                 whw=gs if need_grad_gc else None, bam=0, weight_c=gc is not None,
                                 weight_hw=gs is not None, need_c=need_grad_gc, need_hw=need_grad_gs)
    none = x.new_empty(0, dtype=L.acc)
    return (grad_gc if grad_gc is not None else none, grad_gs if grad_gs is not None else none)


def spatial_stats_backward(x: Tensor, gc: Tensor, smax: Tensor, scount: Tensor, grad_smean: Tensor,
                           grad_smax: Tensor) -> Tensor:
    """The channel gate's gradient through the spatial statistics of x * gc:
    grad_gc[b, c] = sum_hw x * (grad_smean / C + grad_smax * [x*gc == smax] / scount)."""
    fn = "spatial_stats_backward"
    L = _check_x(x, fn)
    n_c, n_hw = L.B * L.C, L.B * L.HW
    for t, name, n in ((gc, "gc", n_c), (smax, "smax", n_hw), (grad_smean, "grad_smean", n_hw),
                       (grad_smax, "grad_smax", n_hw)):
        if t is None:
            raise ValueError(_err(fn, f"{name} is required"))
        _check_small(t, name, n, x, fn, L.acc)
    if scount is None:
        raise ValueError(_err(fn, "scount is required"))
    _check_small(scount, "scount", n_hw, x, fn, torch.int32)
    plan = _split_plan(L)
    part = torch.empty(L.B, plan.nsplit, L.C, dtype=L.acc, device=x.device)
    with _device_guard(x):
        _spatial_stats_backward_kernel[(L.B * plan.grid,)](
            x, gc, smax, scount, grad_smean, grad_smax, part, L.C, L.HW, L.sB, L.sC, L.sHW,
            plan.ncb, plan.nsplit, plan.tps, ACC=_tl_acc(L), BLOCK_C=plan.block_c,
            BLOCK_HW=plan.block_hw, num_warps=_num_warps(plan.block_c, plan.block_hw))
        return _combine_sums(part, L.B, L.C)


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


def _check_bam(x: Tensor, mc: Tensor, ms: Tensor, fn: str) -> _Layout:
    L = _check_x(x, fn)
    for t, name, n in ((mc, "mc", L.B * L.C), (ms, "ms", L.B * L.HW)):
        if t is None:
            raise ValueError(_err(fn, f"{name} is required"))
        _check_small(t, name, n, x, fn, L.acc)
    return L


def bam_combine(x: Tensor, mc: Tensor, ms: Tensor, product: bool) -> Tensor:
    """BAM's combine ``x * (1 + sigmoid(z))``, z = mc[b, c] * ms[b, hw] if product else
    mc[b, c] + ms[b, hw]; x's dtype and memory format."""
    L = _check_bam(x, mc, ms, "bam_combine")
    out = torch.empty_like(x)
    with _device_guard(x):
        _launch_elementwise(_bam_elementwise_kernel, L, x, out, mc, ms, _placeholder(x, L.acc),
                            PRODUCT=bool(product), HAS_SRC=True, HAS_CMEAN=False)
    return out


def bam_combine_backward(grad_out: Tensor, x: Tensor, mc: Tensor, ms: Tensor,
                         product: bool) -> Tuple[Tensor, Tensor]:
    """The logits' gradients of the combine from one read of grad_out and x: with
    dz = grad_out * x * s * (1 - s), grad_mc = sum_hw dz (* ms if product), grad_ms = sum_c dz
    (* mc if product)."""
    fn = "bam_combine_backward"
    L = _check_bam(x, mc, ms, fn)
    _check_big(grad_out, "grad_out", x, L, fn)
    product = bool(product)
    return _two_axis(grad_out, x, L, wc=mc, whw=ms, bam=2 if product else 1, weight_c=product,
                     weight_hw=product, need_c=True, need_hw=True)


def bam_input_grad(x: Tensor, grad_out: Optional[Tensor], mc: Tensor, ms: Tensor, product: bool,
                   grad_cmean: Optional[Tensor]) -> Tensor:
    """``grad_out * (1 + sigmoid(z)) + grad_cmean / HW``, each term optional; x's dtype and
    memory format."""
    fn = "bam_input_grad"
    L = _check_bam(x, mc, ms, fn)
    if grad_out is not None:
        _check_big(grad_out, "grad_out", x, L, fn)
    _check_small(grad_cmean, "grad_cmean", L.B * L.C, x, fn, L.acc)
    dx = torch.empty_like(x)
    with _device_guard(x):
        _launch_elementwise(_bam_elementwise_kernel, L, grad_out if grad_out is not None else x, dx, mc, ms,
                            grad_cmean if grad_cmean is not None else _placeholder(x, L.acc),
                            PRODUCT=bool(product), HAS_SRC=grad_out is not None,
                            HAS_CMEAN=grad_cmean is not None)
    return dx
