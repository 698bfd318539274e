"""channel_stats: mean, max and tie count of x over H*W per (b, c), from one read of x."""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._gating_common import (_check_x, _MAX_BLOCK_COMBINE, _merge_max_count, _np2, _num_warps, _split_coords,
                             _split_plan, _tl_acc)
from ._launch import device_guard as _device_guard


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

