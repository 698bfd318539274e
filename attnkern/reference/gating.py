"""Pure-PyTorch reference of the pooled-gating primitives shared by CBAM, SE and BAM.

These are the ground truth every backend (C++ and Triton) is tested against, primitive by
primitive. Shapes: ``x`` is ``[B, C, H, W]`` (any memory format, any strides), ``gc`` is the
channel gate ``[B, C]`` and ``gs`` the spatial gate ``[B, H*W]``; both gates are float32.
All reductions run in float32 (float64 for float64 input: the "accumulation dtype"); gates and
statistics have the accumulation dtype; big outputs have ``x``'s dtype and memory format.

Max pooling follows ``torch.amax``: its gradient is shared equally by all elements equal to the
maximum, so each max comes with ``count``, the number of elements that reach it.

Depends on nothing but torch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "channel_stats",
    "spatial_stats",
    "gate_apply",
    "gate_apply_residual",
    "gate_apply_residual_",
    "gate_apply_backward",
    "spatial_stats_backward",
    "gating_input_grad",
    "bam_combine",
    "bam_combine_backward",
    "bam_input_grad",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions and gates use for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(x: Tensor) -> Tensor:
    """[B, C, H, W] (any dtype) -> [B, C, H*W] in the accumulation dtype."""
    return x.to(acc_dtype(x.dtype)).flatten(2)


def _like_x(y: Tensor, x: Tensor) -> Tensor:
    """Cast an accumulation-dtype [B, C, HW] result back to x's shape, dtype and memory format."""
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    out.copy_(y.view(x.shape))
    return out


def channel_stats(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, max and tie count of ``x`` over H*W, per (b, c): [B, C] each, count int32."""
    xf = _flat(x)
    mean = xf.mean(dim=2)
    mx = xf.amax(dim=2)
    count = (xf == mx.unsqueeze(2)).sum(dim=2, dtype=torch.int32)
    return mean, mx, count


def spatial_stats(x: Tensor, gc: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, max and tie count over C of ``x * gc``, per (b, hw). Returns [B, H*W] each."""
    y = _flat(x) * gc.unsqueeze(2)
    mean = y.mean(dim=1)
    mx = y.amax(dim=1)
    count = (y == mx.unsqueeze(1)).sum(dim=1, dtype=torch.int32)
    return mean, mx, count


def gate_apply(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor]) -> Tensor:
    """``x * gc[b, c] * gs[b, hw]`` in float32, returned in x's dtype and memory format."""
    y = _flat(x)
    if gc is not None:
        y = y * gc.unsqueeze(2)
    if gs is not None:
        y = y * gs.unsqueeze(1)
    return _like_x(y, x)


def _gated_residual(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], residual: Tensor, relu: bool) -> Tensor:
    y = _flat(x)
    if gc is not None:
        y = y * gc.unsqueeze(2)
    if gs is not None:
        y = y * gs.unsqueeze(1)
    y = y + _flat(residual)
    return torch.relu(y) if relu else y


def gate_apply_residual(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], residual: Tensor,
                        relu: bool) -> Tensor:
    """``relu?((x * gc[b, c]) * gs[b, hw] + residual)``, computed in float32 and rounded once to
    x's dtype, in x's memory format: the gate applied with a residual block's add and activation
    (timm's ``act(se(x) + shortcut)``), for training. Its gradient: with
    ``g = grad_out * [out > 0]`` (``grad_out`` without ``relu``), the residual's is g and x's and
    the gates' are those of :func:`gate_apply` for grad_out g."""
    return _like_x(_gated_residual(x, gc, gs, residual, relu), x)


def gate_apply_residual_(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], residual: Tensor,
                         relu: bool) -> Tensor:
    """In place: ``x = relu?((x * gc[b, c]) * gs[b, hw] + residual)``, computed in float32 and
    rounded once to x's dtype: :func:`gate_apply_residual` written into x, for inference (it
    has no gradient). Returns x."""
    x.copy_(_gated_residual(x, gc, gs, residual, relu).view(x.shape))
    return x


def gate_apply_backward(
    grad_out: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
    need_grad_gc: bool = True, need_grad_gs: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Gate gradients of ``out = x * gc * gs``.

    grad_gc[b, c] = sum_hw grad_out * x * gs   (gs taken as 1 when None)
    grad_gs[b, hw] = sum_c grad_out * x * gc   (gc taken as 1 when None)

    A gradient not asked for (``need_grad_* = False``) is an empty tensor.
    """
    p = _flat(grad_out) * _flat(x)
    grad_gc = grad_gs = p.new_empty(0)
    if need_grad_gc:
        grad_gc = (p * gs.unsqueeze(1)).sum(dim=2) if gs is not None else p.sum(dim=2)
    if need_grad_gs:
        grad_gs = (p * gc.unsqueeze(2)).sum(dim=1) if gc is not None else p.sum(dim=1)
    return grad_gc, grad_gs


def _spatial_max_mask(x: Tensor, gc: Tensor, smax: Tensor, scount: Tensor) -> Tensor:
    y = _flat(x) * gc.unsqueeze(2)
    return (y == smax.unsqueeze(1)).to(y.dtype) / scount.unsqueeze(1)


def spatial_stats_backward(
    x: Tensor, gc: Tensor, smax: Tensor, scount: Tensor, grad_smean: Tensor, grad_smax: Tensor
) -> Tensor:
    """The channel gate's gradient through the spatial statistics of ``x * gc``:

    grad_gc[b, c] = sum_hw x * (grad_smean / C + grad_smax * [x*gc == smax] / scount)
    """
    C = x.shape[1]
    w = grad_smean.unsqueeze(1) / C + grad_smax.unsqueeze(1) * _spatial_max_mask(x, gc, smax, scount)
    return (_flat(x) * w).sum(dim=2)


def gating_input_grad(
    x: Tensor,
    grad_out: Optional[Tensor],
    gc: Optional[Tensor],
    gs: Optional[Tensor],
    smax: Optional[Tensor] = None,
    scount: Optional[Tensor] = None,
    grad_smean: Optional[Tensor] = None,
    grad_smax: Optional[Tensor] = None,
    cmax: Optional[Tensor] = None,
    ccount: Optional[Tensor] = None,
    grad_cmean: Optional[Tensor] = None,
    grad_cmax: Optional[Tensor] = None,
) -> Tensor:
    """The input gradient of a gating block, every term optional, in one expression:

    dx = grad_out * gc * gs                                               (if grad_out is given)
       + gc * (grad_smean / C + grad_smax * [x*gc == smax] / scount)      (spatial_stats terms)
       + grad_cmean / HW + grad_cmax * [x == cmax] / ccount               (channel_stats terms)

    Returned in x's dtype and memory format.
    """
    B, C, H, W = x.shape
    HW = H * W
    xf = _flat(x)
    dx = torch.zeros_like(xf)
    if grad_out is not None:
        t = _flat(grad_out)
        if gc is not None:
            t = t * gc.unsqueeze(2)
        if gs is not None:
            t = t * gs.unsqueeze(1)
        dx = dx + t
    sp = torch.zeros_like(xf)
    if grad_smean is not None:
        sp = sp + grad_smean.unsqueeze(1) / C
    if grad_smax is not None:
        sp = sp + grad_smax.unsqueeze(1) * _spatial_max_mask(x, gc, smax, scount)
    if grad_smean is not None or grad_smax is not None:
        dx = dx + (sp * gc.unsqueeze(2) if gc is not None else sp)
    if grad_cmean is not None:
        dx = dx + grad_cmean.unsqueeze(2) / HW
    if grad_cmax is not None:
        mask = (xf == cmax.unsqueeze(2)).to(xf.dtype) / ccount.unsqueeze(2)
        dx = dx + grad_cmax.unsqueeze(2) * mask
    return _like_x(dx, x)


# BAM's combine: out = x * (1 + sigmoid(z)), z = mc[b, c] + ms[b, hw] ("sum", the paper) or
# mc[b, c] * ms[b, hw] ("product", the authors' released code). z is never materialised.

def _bam_z(mc: Tensor, ms: Tensor, product: bool) -> Tensor:
    return mc.unsqueeze(2) * ms.unsqueeze(1) if product else mc.unsqueeze(2) + ms.unsqueeze(1)


def bam_combine(x: Tensor, mc: Tensor, ms: Tensor, product: bool) -> Tensor:
    """``x * (1 + sigmoid(z))`` with z from the channel logits mc [B, C] and the spatial
    logits ms [B, H*W]; returned in x's dtype and memory format."""
    return _like_x(_flat(x) * (1 + torch.sigmoid(_bam_z(mc, ms, product))), x)


def bam_combine_backward(grad_out: Tensor, x: Tensor, mc: Tensor, ms: Tensor, product: bool) -> Tuple[Tensor, Tensor]:
    """The logits' gradients of the combine: with dz = grad_out * x * s * (1 - s), s = sigmoid(z),

    grad_mc[b, c] = sum_hw dz (* ms for product),  grad_ms[b, hw] = sum_c dz (* mc for product).
    """
    s = torch.sigmoid(_bam_z(mc, ms, product))
    dz = _flat(grad_out) * _flat(x) * s * (1 - s)
    if product:
        return (dz * ms.unsqueeze(1)).sum(dim=2), (dz * mc.unsqueeze(2)).sum(dim=1)
    return dz.sum(dim=2), dz.sum(dim=1)


def bam_input_grad(x: Tensor, grad_out: Optional[Tensor], mc: Tensor, ms: Tensor, product: bool,
                   grad_cmean: Optional[Tensor], grad_proj: Optional[Tensor] = None,
                   proj_weight: Optional[Tensor] = None) -> Tensor:
    """The input gradient of the combine plus the channel branch's mean-pool term and the input
    gradient of a 1x1 projection h = W x the spatial branch starts with (W = proj_weight [R, C],
    grad_proj = dL/dh [B, R, H, W]):

    dx = grad_out * (1 + sigmoid(z)) + grad_cmean / HW + W^T grad_proj      (each term optional)
    """
    HW = x.shape[2] * x.shape[3]
    dx = torch.zeros_like(_flat(x))
    if grad_out is not None:
        dx = dx + _flat(grad_out) * (1 + torch.sigmoid(_bam_z(mc, ms, product)))
    if grad_cmean is not None:
        dx = dx + grad_cmean.unsqueeze(2) / HW
    if grad_proj is not None:
        w = proj_weight.reshape(proj_weight.shape[0], -1).to(dx.dtype)
        dx = dx + torch.einsum("rc,brp->bcp", w, _flat(grad_proj))
    return _like_x(dx, x)
