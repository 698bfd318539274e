"""The fused BAM combine: ``x * (1 + sigmoid(mc + ms))`` (or ``mc * ms``) without ever
materialising the [B, C, H, W] attention.

Forward: ``channel_stats`` (1 read) for the channel branch's mean pool; the spatial branch's
convs run in PyTorch on x; ``bam_combine`` (1 read + 1 write). Backward (eager):
``BamCombineNode`` computes dmc = sum_hw dz and dms = sum_c dz (dz = dout * x * s(1 - s)) in one
pass and keeps dout; the branches' backward gives their parameters' gradients and dmean; then
``ChannelStatsNode`` writes dx = dout * (1 + s) + dmean / HW once. Autograd adds the spatial
convs' own input gradient. Under ``torch.compile``: custom ops with their own formulas.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

from .gating import BamCombineNode, ChannelStatsNode, Tape, acc_dtype


def bam(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    *,
    backend: str,
    combine: str = "sum",
) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused BAM block on a validated, dense x. Returns ``(out, mc, ms)``: channel logits
    [B, C] and spatial logits [B, 1, H, W] in the accumulation dtype."""
    B, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    product = combine == "product"
    compiled = torch.compiler.is_compiling()
    if compiled:
        mean, _, _ = torch.ops.attnkern.channel_stats(x, backend)
    else:
        tape = Tape(backend)
        mean, _, _, token = ChannelStatsNode.apply(x, tape)
    mc = mlp(mean).to(acc)
    ms = spatial(x).to(acc).reshape(B, H * W)
    if compiled:
        out = torch.ops.attnkern.bam_combine(x, mc, ms, product, backend)
    else:
        out = BamCombineNode.apply(x, mc, ms, token, tape, product)
    return out, mc, ms.view(B, 1, H, W)
