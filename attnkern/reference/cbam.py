"""Pure-PyTorch reference of the CBAM block (Woo et al., 2018), the ground truth of the fused op.

    gc  = gate(mlp(mean_hw(x)) + mlp(max_hw(x)))                      [B, C]
    y   = x * gc
    gs  = spatial_gate(spatial(cat[mean_c(y), max_c(y)]))             [B, 1, H, W]
    out = y * gs

``pool_order='mean_max'`` is timm's ``CbamModule`` order of the two spatial maps;
``'max_mean'`` is the CBAM authors' code. ``mlp`` maps ``[N, C] -> [N, C]`` and ``spatial``
maps ``[B, 2, H, W] -> [B, 1, H, W]`` (in the module: 1x1-conv MLP, kxk conv + BatchNorm).
``spatial_gate`` defaults to ``gate`` (timm's module has one of each, the same by default).
Everything runs in x's dtype, as timm's module does (the gates are cast to it). Depends on nothing but torch.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

POOL_ORDERS = ("mean_max", "max_mean")


def cbam(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    *,
    pool_order: str = "mean_max",
    gate: Callable[[Tensor], Tensor] = torch.sigmoid,
    spatial_gate: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out, gc, gs)``: the output, the channel gate [B, C], the spatial gate [B, 1, H, W]."""
    if pool_order not in POOL_ORDERS:
        raise ValueError(f"pool_order must be one of {POOL_ORDERS}, got {pool_order!r}")
    gc = gate(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3)))).to(x.dtype)
    y = x * gc[:, :, None, None]
    mean_c = y.mean(dim=1, keepdim=True)
    max_c = y.amax(dim=1, keepdim=True)
    maps = [mean_c, max_c] if pool_order == "mean_max" else [max_c, mean_c]
    gs = (spatial_gate or gate)(spatial(torch.cat(maps, dim=1))).to(x.dtype)
    return y * gs, gc, gs
