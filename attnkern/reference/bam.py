"""Pure-PyTorch reference of the Bottleneck Attention Module (Park et al., 2018).

    mc  = mlp(mean_hw(x))                 [B, C]  (Linear, BatchNorm1d, ReLU, Linear)
    ms  = spatial(x)                      [B, 1, H, W]  (1x1 reduce, dilated 3x3s, 1x1)
    out = x * (1 + sigmoid(mc + ms))      combine='sum' (the paper)
    out = x * (1 + sigmoid(mc * ms))      combine='product' (the authors' released code)

Runs in x's dtype. Depends on nothing but torch.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

COMBINES = ("sum", "product")


def bam(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    *,
    combine: str = "sum",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out, mc, ms)``: the output, the channel logits [B, C] and the spatial logits
    [B, 1, H, W]."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    mc = mlp(x.mean(dim=(2, 3))).to(x.dtype)
    ms = spatial(x).to(x.dtype)
    z = mc[:, :, None, None] * ms if combine == "product" else mc[:, :, None, None] + ms
    return x * (1 + torch.sigmoid(z)), mc, ms
