"""BAM's combine out = x * (1 + sigmoid(z)), z = mc + ms or mc * ms: bam_combine (one read, one
write), bam_combine_backward (the logits' gradients, one read of grad_out and x) and
bam_input_grad (the input gradient with the channel-mean term, one write)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._gating_common import (_check_big, _check_small, _check_x, _err, _launch_elementwise, _Layout,
                             _placeholder, _tile_coords)
from ._launch import device_guard as _device_guard
from ._both_axes import bam_sigmoid, reduce_both_axes


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
        s = bam_sigmoid(mc[:, None], ms[None, :], PRODUCT)
        out += tl.load(src_ptr + off, mask=mask, other=0.0).to(ACC) * (1.0 + s)
    if HAS_CMEAN:
        out += (tl.load(dcmean_ptr + b * C + offs_c, mask=mask_c, other=0.0) / HW)[:, None]
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=mask)


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
    return reduce_both_axes(grad_out, x, L, channel_weight=mc, pixel_weight=ms, bam=2 if product else 1,
                            weight_by_channel=product, weight_by_pixel=product, need_per_channel=True,
                            need_per_pixel=True)


def bam_input_grad(x: Tensor, grad_out: Optional[Tensor], mc: Tensor, ms: Tensor, product: bool,
                   grad_cmean: Optional[Tensor], grad_proj: Optional[Tensor] = None,
                   proj_weight: Optional[Tensor] = None) -> Tensor:
    """``grad_out * (1 + sigmoid(z)) + grad_cmean / HW + proj_weight^T grad_proj``, each term
    optional; x's dtype and memory format. The projection's term (grad_proj [B, R, H, W] dense in
    x's layout and proj_weight [R, C], both in the accumulation dtype) is added after the kernel
    by a matrix product into dx in place (cuBLAS; ``pointwise_projection_backward_``)."""
    fn = "bam_input_grad"
    L = _check_bam(x, mc, ms, fn)
    if grad_out is not None:
        _check_big(grad_out, "grad_out", x, L, fn)
    _check_small(grad_cmean, "grad_cmean", L.B * L.C, x, fn, L.acc)
    if (grad_proj is None) != (proj_weight is None):
        raise ValueError(_err(fn, "grad_proj and proj_weight must be given together"))
    if grad_proj is not None:
        R = proj_weight.shape[0]
        _check_small(proj_weight, "proj_weight", R * L.C, x, fn, L.acc)
        if (tuple(grad_proj.shape) != (L.B, R) + tuple(x.shape[2:]) or grad_proj.dtype != L.acc
                or grad_proj.device != x.device):
            raise ValueError(_err(fn, f"grad_proj must be a {L.acc} tensor [B, R, H, W] = "
                                      f"{[L.B, R] + list(x.shape[2:])} on {x.device}, got {grad_proj.dtype}, "
                                      f"shape {tuple(grad_proj.shape)}, device {grad_proj.device}"))
        from ..ops.gating import pointwise_projection_backward_  # the ops layer imports this module

        dx = bam_input_grad(x, grad_out, mc, ms, product, grad_cmean)
        pointwise_projection_backward_(dx, x, proj_weight.to(dx.dtype), grad_proj.to(dx.dtype), False, False)
        return dx
    dx = torch.empty_like(x)
    with _device_guard(x):
        _launch_elementwise(_bam_elementwise_kernel, L, grad_out if grad_out is not None else x, dx, mc, ms,
                            grad_cmean if grad_cmean is not None else _placeholder(x, L.acc),
                            PRODUCT=bool(product), HAS_SRC=grad_out is not None,
                            HAS_CMEAN=grad_cmean is not None)
    return dx

