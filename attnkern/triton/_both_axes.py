"""The pass that reduces a per-element product over both axes at once (from one read of grad_out
and x), shared by gate_apply_backward and bam_combine_backward: the sum along the axis a
program loops over is kept in registers, the other is written as one partial per tile and
combined afterwards."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._gating_common import (_MIN_BLOCK_C_FOR_HW_LOOP, _c_loop_tile, _combine_sums, _Layout, _num_warps,
                             _placeholder, _split_coords, _split_plan, _tl_acc)
from ._launch import device_guard as _device_guard


@triton.jit
def bam_sigmoid(mc, ms, PRODUCT: tl.constexpr):
    """s = sigmoid(z) with z = mc * ms (product) or mc + ms, broadcast [BLOCK_C, 1] x [1, BLOCK_HW]."""
    if PRODUCT:
        z = mc * ms
    else:
        z = mc + ms
    return tl.sigmoid(z)


@triton.jit
def _grad_product_tile(d_ptr, x_ptr, off, mask, cw, pw, BAM: tl.constexpr, ACC: tl.constexpr):
    """q = grad_out * x (BAM == 0), or grad_out * x * s * (1 - s) with s = sigmoid(z) and
    z = cw + pw (BAM == 1) or cw * pw (BAM == 2), for one tile; zero outside the mask."""
    q = tl.load(d_ptr + off, mask=mask, other=0.0).to(ACC) * tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    if BAM != 0:
        s = bam_sigmoid(cw[:, None], pw[None, :], BAM == 2)
        q = q * s * (1.0 - s)
    return q


@triton.jit
def _both_axes_loop_c_kernel(d_ptr, x_ptr, cw_ptr, pw_ptr, per_channel_ptr, per_pixel_ptr, C, HW, sB, sC, sHW,
                             NSPLIT, BAM: tl.constexpr, HAS_CW: tl.constexpr, HAS_PW: tl.constexpr,
                             WEIGHT_BY_CW: tl.constexpr, WEIGHT_BY_PW: tl.constexpr,
                             NEED_PER_CHANNEL: tl.constexpr, NEED_PER_PIXEL: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """One program per (b, pixel block) loops over all of C: per_pixel is complete (one
    partial), per_channel is written per pixel block (NSPLIT = number of pixel blocks).
    q from ``_grad_product_tile``; cw / pw stay 0.0 (never read) when their tensor is absent."""
    pid = tl.program_id(0)
    b = (pid // NSPLIT).to(tl.int64)
    hb = pid % NSPLIT
    offs_hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_hw = offs_hw < HW
    if HAS_PW:
        pw = tl.load(pw_ptr + b * HW + offs_hw, mask=mask_hw, other=0.0)
    else:
        pw = 0.0
    cols = b * sB + offs_hw.to(tl.int64)[None, :] * sHW
    per_pixel = tl.zeros([BLOCK_HW], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if HAS_CW:
            cw = tl.load(cw_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        else:
            cw = 0.0
        mask = mask_c[:, None] & mask_hw[None, :]
        q = _grad_product_tile(d_ptr, x_ptr, cols + offs_c.to(tl.int64)[:, None] * sC, mask, cw, pw, BAM, ACC)
        if NEED_PER_PIXEL:
            if WEIGHT_BY_CW:
                per_pixel += tl.sum(q * cw[:, None], axis=0)
            else:
                per_pixel += tl.sum(q, axis=0)
        if NEED_PER_CHANNEL:
            if WEIGHT_BY_PW:
                per_channel = tl.sum(q * pw[None, :], axis=1)
            else:
                per_channel = tl.sum(q, axis=1)
            tl.store(per_channel_ptr + (b * NSPLIT + hb) * C + offs_c, per_channel, mask=mask_c)
    if NEED_PER_PIXEL:
        tl.store(per_pixel_ptr + b * HW + offs_hw, per_pixel, mask=mask_hw)


@triton.jit
def _both_axes_loop_hw_kernel(d_ptr, x_ptr, cw_ptr, pw_ptr, per_channel_ptr, per_pixel_ptr, C, HW, sB, sC, sHW,
                              NCB, NSPLIT, TPS, BAM: tl.constexpr, HAS_CW: tl.constexpr, HAS_PW: tl.constexpr,
                              WEIGHT_BY_CW: tl.constexpr, WEIGHT_BY_PW: tl.constexpr,
                              NEED_PER_CHANNEL: tl.constexpr, NEED_PER_PIXEL: tl.constexpr,
                              ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """One program per (b, channel block, pixel range) loops over its pixel tiles: per_channel
    is written per range (NSPLIT ranges), per_pixel per channel block (NCB partials).
    q from ``_grad_product_tile``; cw / pw stay 0.0 (never read) when their tensor is absent."""
    b, cb, s = _split_coords(NCB, NSPLIT)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if HAS_CW:
        cw = tl.load(cw_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    else:
        cw = 0.0
    rows = b * sB + offs_c.to(tl.int64)[:, None] * sC
    per_channel = tl.zeros([BLOCK_C], dtype=ACC)
    hw_lo = s * (TPS * BLOCK_HW)
    hw_hi = tl.minimum(hw_lo + TPS * BLOCK_HW, HW)
    for h0 in range(hw_lo, hw_hi, BLOCK_HW):
        offs_hw = h0 + tl.arange(0, BLOCK_HW)
        mask_hw = offs_hw < HW
        if HAS_PW:
            pw = tl.load(pw_ptr + b * HW + offs_hw, mask=mask_hw, other=0.0)
        else:
            pw = 0.0
        mask = mask_c[:, None] & mask_hw[None, :]
        q = _grad_product_tile(d_ptr, x_ptr, rows + offs_hw.to(tl.int64)[None, :] * sHW, mask, cw, pw, BAM, ACC)
        if NEED_PER_CHANNEL:
            if WEIGHT_BY_PW:
                per_channel += tl.sum(q * pw[None, :], axis=1)
            else:
                per_channel += tl.sum(q, axis=1)
        if NEED_PER_PIXEL:
            if WEIGHT_BY_CW:
                per_pixel = tl.sum(q * cw[:, None], axis=0)
            else:
                per_pixel = tl.sum(q, axis=0)
            tl.store(per_pixel_ptr + (b * NCB + cb) * HW + offs_hw, per_pixel, mask=mask_hw)
    if NEED_PER_CHANNEL:
        tl.store(per_channel_ptr + (b * NSPLIT + s) * C + offs_c, per_channel, mask=mask_c)


def reduce_both_axes(grad_out: Tensor, x: Tensor, L: _Layout, channel_weight: Optional[Tensor],
                     pixel_weight: Optional[Tensor], bam: int, weight_by_channel: bool,
                     weight_by_pixel: bool, need_per_channel: bool,
                     need_per_pixel: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """From one read of grad_out and x, with q = grad_out * x [* s * (1 - s)] (BAM's logits
    channel_weight + / * pixel_weight when ``bam``):

        per_channel[b, c] = sum_hw q * pixel_weight[b, hw]   (the weight only if weight_by_pixel)
        per_pixel[b, hw]  = sum_c  q * channel_weight[b, c]  (the weight only if weight_by_channel)

    each only if asked for (else None). The pass loops over C when a tile spans few channels
    (``_both_axes_loop_c_kernel``), else over pixels (``_both_axes_loop_hw_kernel``)."""
    if not (need_per_channel or need_per_pixel):
        return None, None
    B, C, HW = L.B, L.C, L.HW
    plan = _split_plan(L)
    loop_c = need_per_pixel and plan.block_c < _MIN_BLOCK_C_FOR_HW_LOOP
    if loop_c:
        bc, bhw = _c_loop_tile(L)
        ncb, nsplit, tps = 1, triton.cdiv(HW, bhw), 1
        grid = B * nsplit
    else:
        bc, bhw, ncb, nsplit, tps = plan
        grid = B * plan.grid
    per_channel = torch.empty(B, nsplit if need_per_channel else 1, C, dtype=L.acc, device=x.device)
    per_pixel = torch.empty(B, ncb if need_per_pixel else 1, HW, dtype=L.acc, device=x.device)
    cw = channel_weight if channel_weight is not None else _placeholder(x, L.acc)
    pw = pixel_weight if pixel_weight is not None else _placeholder(x, L.acc)
    meta = dict(BAM=bam, HAS_CW=channel_weight is not None, HAS_PW=pixel_weight is not None,
                WEIGHT_BY_CW=weight_by_channel, WEIGHT_BY_PW=weight_by_pixel,
                NEED_PER_CHANNEL=need_per_channel, NEED_PER_PIXEL=need_per_pixel, ACC=_tl_acc(L),
                BLOCK_C=bc, BLOCK_HW=bhw, num_warps=_num_warps(bc, bhw))
    with _device_guard(x):
        if loop_c:
            _both_axes_loop_c_kernel[(grid,)](grad_out, x, cw, pw, per_channel, per_pixel, C, HW, L.sB, L.sC,
                                              L.sHW, nsplit, **meta)
        else:
            _both_axes_loop_hw_kernel[(grid,)](grad_out, x, cw, pw, per_channel, per_pixel, C, HW, L.sB, L.sC,
                                               L.sHW, ncb, nsplit, tps, **meta)
        per_channel = _combine_sums(per_channel, B, C) if need_per_channel else None
        per_pixel = _combine_sums(per_pixel, B, HW) if need_per_pixel else None
    return per_channel, per_pixel
