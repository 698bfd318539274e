"""The fused CBAM block: three passes over x forward, three backward, one write of dx.

Forward (``pool_order``, ``gate``, the channel ``mlp`` and the ``spatial`` conv are the
caller's; only the passes over the big tensor are kernels):

    mean_c, max_c = channel_stats(x)                 1 read
    gc = gate(mlp(mean_c) + mlp(max_c))              PyTorch, [B, C]
    mean_s, max_s = spatial_stats(x, gc)             1 read
    gs = gate(spatial([mean_s; max_s]))              PyTorch, [B, H*W]
    out = gate_apply(x, gc, gs)                      1 read + 1 write
          (in a residual block: relu?(gate_apply(x, gc, gs) + residual),
          gate_apply_residual, 1 more read)

Backward (eager): autograd runs the three nodes of :mod:`attnkern.ops.gating` in reverse:
``gate_apply_backward`` (the gates' gradients) in ``ApplyNode``, ``spatial_stats_backward`` (the
channel gate's gradient through the spatial statistics) in ``SpatialStatsNode``, the small
PyTorch graphs in between give their parameters' gradients, and ``ChannelStatsNode``, run last,
writes dx once with ``gating_input_grad``. Saved for backward: x (one storage, saved by each node for
autograd's in-place checks) and [B, C] / [B, HW] statistics.

Under ``torch.compile`` the same ops run with their own autograd formulas, which the compiler
can trace; each then writes its own term of dx and the compiled graph adds them
(:class:`attnkern.ops.gating.BlockPasses` chooses).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .gating import BlockPasses, acc_dtype


def cbam(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    *,
    primitives=None,
    pool_order: str = "mean_max",
    gate: Callable[[Tensor], Tensor] = torch.sigmoid,
    spatial_gate: Optional[Callable[[Tensor], Tensor]] = None,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    in_place: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused CBAM block on an already validated, dense (:func:`dense`) ``x``. Returns
    ``(out, gc, gs)`` with gc [B, C] and gs [B, 1, H, W] in the accumulation dtype (float32;
    float64 for float64 x). ``primitives``: the kernels (:func:`attnkern.ops.gating.as_primitives`;
    default: the ``attnkern::`` ops through the dispatcher).

    ``mlp`` maps [N, C] -> [N, C]; ``spatial`` maps [B, 2, H, W] -> [B, 1, H, W]. They receive
    float32 statistics (cast them to their parameters' dtype if needed); their outputs are
    gated in float32. ``spatial_gate`` (default: ``gate``) is the spatial branch's gate.

    With ``residual`` (x's shape, dtype and layout), ``out = relu?(cbam(x) + residual)``: a
    residual block's add and activation in the apply pass (``gate_apply_residual``), with
    autograd: no pass of their own forward; backward, the ReLU's mask is the one pass they keep
    (as the ReLU's own backward). ``in_place`` (inference without autograd, in a block that owns
    x): the result written into x, no new big tensor.
    """
    B, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    passes = BlockPasses(primitives)

    mean_c, max_c = passes.channel_stats(x)
    logits = mlp(torch.cat([mean_c, max_c], dim=0)).to(acc)
    gc = gate(logits[:B] + logits[B:])

    mean_s, max_s = passes.spatial_stats(x, gc)
    maps = (mean_s, max_s) if pool_order == "mean_max" else (max_s, mean_s)
    s = torch.stack(maps, dim=1).view(B, 2, H, W)
    gs = (spatial_gate or gate)(spatial(s).to(acc)).reshape(B, H * W)

    if residual is not None:
        out = passes.gate_apply_residual(x, gc, gs, residual, relu, in_place)
    else:
        out = passes.gate_apply(x, gc, gs)
    return out, gc, gs.view(B, 1, H, W)
