"""spatial_stats: mean, max and tie count over C of x * gc per (b, hw), from one read of x;
and spatial_stats_backward, the channel gate's gradient through them (one read of x)."""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._gating_common import (_c_loop_tile, _check_small, _check_x, _combine_sums, _err, _merge_max_count,
                             _num_warps, _split_coords, _split_plan, _tl_acc)
from ._launch import device_guard as _device_guard


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

