"""The fused CBAM block: three passes over x forward, three backward, one write of dx.

Forward (``pool_order``, ``gate``, the channel ``mlp`` and the ``spatial`` conv are the
caller's; only the passes over the big tensor are kernels):

    mean_c, max_c = channel_stats(x)                 1 read
    gc = gate(mlp(mean_c) + mlp(max_c))              PyTorch, [B, C]
    mean_s, max_s = spatial_stats(x, gc)             1 read
    gs = gate(spatial([mean_s; max_s]))              PyTorch, [B, H*W]
    out = gate_apply(x, gc, gs)                      1 read + 1 write

Backward (eager): autograd runs the three nodes of :mod:`attnkern.ops.gating` in reverse:
``gate_apply_backward`` (the gates' gradients) in ``ApplyNode``, ``spatial_stats_backward`` (the
channel gate's gradient through the spatial statistics) in ``SpatialStatsNode``, the small
PyTorch graphs in between give their parameters' gradients, and ``ChannelStatsNode``, run last,
writes dx once with ``gating_input_grad``. Saved for backward: x (one storage, saved by each node for
autograd's in-place checks) and [B, C] / [B, HW] statistics.

Under ``torch.compile`` the same ops run with their own autograd formulas
(:mod:`attnkern.ops.gating`), which the compiler can trace; each then writes its own term of dx
and the compiled graph adds them.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

from .gating import ApplyNode, ChannelStatsNode, SpatialStatsNode, Tape, acc_dtype, as_primitives


def cbam(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    *,
    primitives=None,
    pool_order: str = "mean_max",
    gate: Callable[[Tensor], Tensor] = torch.sigmoid,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused CBAM block on an already validated, dense (:func:`dense`) ``x``. Returns
    ``(out, gc, gs)`` with gc [B, C] and gs [B, 1, H, W] in the accumulation dtype (float32;
    float64 for float64 x). ``primitives``: the kernels (:func:`attnkern.ops.gating.as_primitives`;
    default: the ``attnkern::`` ops through the dispatcher).

    ``mlp`` maps [N, C] -> [N, C]; ``spatial`` maps [B, 2, H, W] -> [B, 1, H, W]. They receive
    float32 statistics (cast them to their parameters' dtype if needed); their outputs are
    gated in float32.
    """
    B, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    compiled = torch.compiler.is_compiling()

    if compiled:
        mean_c, max_c, _ = torch.ops.attnkern.channel_stats(x)
    else:
        tape = Tape(as_primitives(primitives))
        mean_c, max_c, _, token = ChannelStatsNode.apply(x, tape)
    logits = mlp(torch.cat([mean_c, max_c], dim=0)).to(acc)
    gc = gate(logits[:B] + logits[B:])

    if compiled:
        mean_s, max_s, _ = torch.ops.attnkern.spatial_stats(x, gc)
    else:
        mean_s, max_s, _ = SpatialStatsNode.apply(x, gc, token, tape)
    maps = (mean_s, max_s) if pool_order == "mean_max" else (max_s, mean_s)
    s = torch.stack(maps, dim=1).view(B, 2, H, W)
    gs = gate(spatial(s).to(acc)).reshape(B, H * W)

    if compiled:
        out = torch.ops.attnkern.gate_apply(x, gc, gs)
    else:
        out = ApplyNode.apply(x, gc, gs, token, tape)
    return out, gc, gs.view(B, 1, H, W)
