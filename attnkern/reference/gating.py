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
    "gate_bwd_a",
    "cbam_bwd_b",
    "gate_bwd_c",
    "bam_combine",
    "bam_combine_bwd",
    "bam_dx",
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


def gate_bwd_a(
    dout: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
    need_dgc: bool = True, need_dgs: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gate gradients of ``out = x * gc * gs``.

    dgc[b, c] = sum_hw dout * x * gs   (gs taken as 1 when None)
    dgs[b, hw] = sum_c dout * x * gc   (gc taken as 1 when None)
    """
    p = _flat(dout) * _flat(x)
    dgc = dgs = None
    if need_dgc:
        dgc = (p * gs.unsqueeze(1)).sum(dim=2) if gs is not None else p.sum(dim=2)
    if need_dgs:
        dgs = (p * gc.unsqueeze(2)).sum(dim=1) if gc is not None else p.sum(dim=1)
    return dgc, dgs


def _spatial_max_mask(x: Tensor, gc: Tensor, smax: Tensor, scount: Tensor) -> Tensor:
    y = _flat(x) * gc.unsqueeze(2)
    return (y == smax.unsqueeze(1)).to(y.dtype) / scount.unsqueeze(1)


def cbam_bwd_b(
    x: Tensor, gc: Tensor, smax: Tensor, scount: Tensor, dsmean: Tensor, dsmax: Tensor
) -> Tensor:
    """Channel-gate gradient through the spatial statistics of ``x * gc``.

    dgc[b, c] = sum_hw x * (dsmean / C + dsmax * [x*gc == smax] / scount)
    """
    C = x.shape[1]
    w = dsmean.unsqueeze(1) / C + dsmax.unsqueeze(1) * _spatial_max_mask(x, gc, smax, scount)
    return (_flat(x) * w).sum(dim=2)


def gate_bwd_c(
    x: Tensor,
    dout: Optional[Tensor],
    gc: Optional[Tensor],
    gs: Optional[Tensor],
    smax: Optional[Tensor] = None,
    scount: Optional[Tensor] = None,
    dsmean: Optional[Tensor] = None,
    dsmax: Optional[Tensor] = None,
    cmax: Optional[Tensor] = None,
    ccount: Optional[Tensor] = None,
    dcmean: Optional[Tensor] = None,
    dcmax: Optional[Tensor] = None,
) -> Tensor:
    """The input gradient of a gating block, every term optional, in one expression:

    dx = dout * gc * gs                                           (if dout is given)
       + gc * (dsmean / C + dsmax * [x*gc == smax] / scount)      (spatial-stats terms)
       + dcmean / HW + dcmax * [x == cmax] / ccount               (channel-stats terms)

    Returned in x's dtype and memory format.
    """
    B, C, H, W = x.shape
    HW = H * W
    xf = _flat(x)
    dx = torch.zeros_like(xf)
    if dout is not None:
        t = _flat(dout)
        if gc is not None:
            t = t * gc.unsqueeze(2)
        if gs is not None:
            t = t * gs.unsqueeze(1)
        dx = dx + t
    sp = torch.zeros_like(xf)
    if dsmean is not None:
        sp = sp + dsmean.unsqueeze(1) / C
    if dsmax is not None:
        sp = sp + dsmax.unsqueeze(1) * _spatial_max_mask(x, gc, smax, scount)
    if dsmean is not None or dsmax is not None:
        dx = dx + (sp * gc.unsqueeze(2) if gc is not None else sp)
    if dcmean is not None:
        dx = dx + dcmean.unsqueeze(2) / HW
    if dcmax is not None:
        mask = (xf == cmax.unsqueeze(2)).to(xf.dtype) / ccount.unsqueeze(2)
        dx = dx + dcmax.unsqueeze(2) * mask
    return _like_x(dx, x)


# BAM's combine: out = x * (1 + sigmoid(z)), z = mc[b, c] + ms[b, hw] ("sum", the paper) or
# mc[b, c] * ms[b, hw] ("product", the authors' released code). z is never materialised.

def _bam_z(mc: Tensor, ms: Tensor, product: bool) -> Tensor:
    return mc.unsqueeze(2) * ms.unsqueeze(1) if product else mc.unsqueeze(2) + ms.unsqueeze(1)


def bam_combine(x: Tensor, mc: Tensor, ms: Tensor, product: bool) -> Tensor:
    """``x * (1 + sigmoid(z))`` with z from the channel logits mc [B, C] and the spatial
    logits ms [B, H*W]; returned in x's dtype and memory format."""
    return _like_x(_flat(x) * (1 + torch.sigmoid(_bam_z(mc, ms, product))), x)


def bam_combine_bwd(dout: Tensor, x: Tensor, mc: Tensor, ms: Tensor, product: bool) -> Tuple[Tensor, Tensor]:
    """Logit gradients of the combine: with dz = dout * x * s * (1 - s), s = sigmoid(z),

    dmc[b, c] = sum_hw dz (* ms for product),  dms[b, hw] = sum_c dz (* mc for product).
    """
    s = torch.sigmoid(_bam_z(mc, ms, product))
    dz = _flat(dout) * _flat(x) * s * (1 - s)
    if product:
        return (dz * ms.unsqueeze(1)).sum(dim=2), (dz * mc.unsqueeze(2)).sum(dim=1)
    return dz.sum(dim=2), dz.sum(dim=1)


def bam_dx(x: Tensor, dout: Optional[Tensor], mc: Tensor, ms: Tensor, product: bool,
           dcmean: Optional[Tensor]) -> Tensor:
    """The input gradient of the combine plus the channel branch's mean-pool term:

    dx = dout * (1 + sigmoid(z)) + dcmean / HW      (each term optional)
    """
    HW = x.shape[2] * x.shape[3]
    dx = torch.zeros_like(_flat(x))
    if dout is not None:
        dx = dx + _flat(dout) * (1 + torch.sigmoid(_bam_z(mc, ms, product)))
    if dcmean is not None:
        dx = dx + dcmean.unsqueeze(2) / HW
    return _like_x(dx, x)
