"""gate_apply: out = (x * gc) * gs, each gate optional (one read, one write);
gate_apply_residual: out = relu?((x * gc) * gs + residual) (two reads, one write);
gate_apply_residual_: the same written into x; and
gate_apply_backward, the gates' gradients (one read of grad_out and x)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._gating_common import (_check_big, _check_small, _check_x, _err, _launch_elementwise, _placeholder,
                             _tile_coords)
from ._launch import device_guard as _device_guard
from ._both_axes import reduce_both_axes


@triton.jit
def _gate_apply_kernel(x_ptr, out_ptr, gc_ptr, gs_ptr, residual_ptr, C, HW, sB, sC, sHW, NCB, NHB,
                       HAS_GC: tl.constexpr, HAS_GS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                       RELU: tl.constexpr, CL: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """out = relu?((x * gc) * gs + residual) for one tile, each gate and the residual optional
    (out may be x: each element is read before it is written)."""
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
    if HAS_RESIDUAL:
        y = y + tl.load(residual_ptr + off, mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as torch.relu
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


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
                            gs if gs is not None else ph, x, HAS_GC=gc is not None, HAS_GS=gs is not None,
                            HAS_RESIDUAL=False, RELU=False)
    return out


def _gate_apply_residual_into(out: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
                              residual: Tensor, relu: bool, fn: str, L) -> Tensor:
    """gate_apply_residual(_)'s checks and launch: ``out = relu?((x * gc) * gs + residual)``
    (out may be x)."""
    _check_small(gc, "gc", L.B * L.C, x, fn, L.acc)
    _check_small(gs, "gs", L.B * L.HW, x, fn, L.acc)
    _check_big(residual, "residual", x, L, fn)
    ph = _placeholder(x, L.acc)
    with _device_guard(x):
        _launch_elementwise(_gate_apply_kernel, L, x, out, gc if gc is not None else ph,
                            gs if gs is not None else ph, residual, HAS_GC=gc is not None,
                            HAS_GS=gs is not None, HAS_RESIDUAL=True, RELU=bool(relu))
    return out


def gate_apply_residual(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], residual: Tensor,
                        relu: bool) -> Tensor:
    """``relu?((x * gc[b, c]) * gs[b, hw] + residual)`` (residual: x's shape, dtype and memory
    format), in x's dtype and memory format."""
    fn = "gate_apply_residual"
    L = _check_x(x, fn)
    return _gate_apply_residual_into(torch.empty_like(x), x, gc, gs, residual, relu, fn, L)


def gate_apply_residual_(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], residual: Tensor,
                         relu: bool) -> Tensor:
    """In place: ``x = relu?((x * gc[b, c]) * gs[b, hw] + residual)`` (residual: x's shape, dtype
    and memory format); returns x."""
    fn = "gate_apply_residual_"
    L = _check_x(x, fn)
    if isinstance(residual, Tensor) and residual.data_ptr() == x.data_ptr():
        raise ValueError(_err(fn, "residual must not be x itself"))
    return _gate_apply_residual_into(x, x, gc, gs, residual, relu, fn, L)


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
    grad_gc, grad_gs = reduce_both_axes(grad_out, x, L, channel_weight=gc if need_grad_gs else None,
                                        pixel_weight=gs if need_grad_gc else None, bam=0,
                                        weight_by_channel=gc is not None, weight_by_pixel=gs is not None,
                                        need_per_channel=need_grad_gc, need_per_pixel=need_grad_gs)
    none = x.new_empty(0, dtype=L.acc)
    return (grad_gc if grad_gc is not None else none, grad_gs if grad_gs is not None else none)

