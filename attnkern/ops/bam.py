"""The fused BAM combine: ``x * (1 + sigmoid(mc + ms))`` (or ``mc * ms``) without ever
materialising the [B, C, H, W] attention.

Forward: ``channel_stats`` (1 read) for the channel branch's mean pool; the spatial branch's
convs run in PyTorch on x; ``bam_combine`` (1 read + 1 write). Backward (eager):
``BamCombineNode`` computes grad_mc = sum_hw dz and grad_ms = sum_c dz (dz = grad_out * x *
s(1 - s)) in one pass (``bam_combine_backward``) and keeps grad_out; the branches' backward gives
their parameters' gradients and grad_mean; then ``ChannelStatsNode`` writes dx = grad_out *
(1 + s) + grad_mean / HW once (``bam_input_grad``) with the spatial convs' own input gradient:
when the branch starts with a 1x1 convolution of x to at most 16 channels
(``FUSED_PROJECTION_GRAD_MAX_RANK``), its ``W^T grad`` inside that same pass; otherwise added into
dx in place afterwards (the branch reads x, or its first 1x1 convolution of x, as
``ChannelStatsNode`` returns it). Under ``torch.compile``: the ops with their own autograd formulas.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .gating import BlockPasses, acc_dtype


def bam(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    *,
    primitives=None,
    combine: str = "sum",
    spatial_projection: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused BAM block on a validated, dense x. Returns ``(out, mc, ms)``: channel logits
    [B, C] and spatial logits [B, 1, H, W] in the accumulation dtype. ``spatial_projection``:
    the (weight, bias) of the 1x1 convolution the spatial branch starts with, in x's dtype;
    ``spatial`` then receives its output instead of x."""
    B, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    product = combine == "product"
    passes = BlockPasses(primitives)
    mean, _, branch_in = passes.channel_stats_and_branch_input(x, spatial_projection)
    mc = mlp(mean).to(acc)
    ms = spatial(branch_in).to(acc).reshape(B, H * W)
    out = passes.bam_combine(x, mc, ms, product)
    return out, mc, ms.view(B, 1, H, W)
