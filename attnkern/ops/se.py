"""The fused squeeze-and-excitation block: two passes over x forward, two backward.

    mean, max = channel_stats(x)          1 read
    gc = gate(mlp(mean))                  PyTorch, [B, C] (mean/2 + max/2 with add_maxpool)
    out = gate_apply(x, gc)               1 read + 1 write
          (in a residual block: relu?(gate_apply(x, gc) + residual), gate_apply_residual,
          1 more read)

Backward (eager): ``ApplyNode`` computes grad_gc = sum_hw grad_out * x (``gate_apply_backward``)
and keeps grad_out; the MLP's backward gives grad_mean (and grad_max); ``ChannelStatsNode``
writes dx = grad_out * gc + grad_mean / HW (+ the max term) once (``gating_input_grad``). Under
``torch.compile`` the ops run with their own autograd formulas (see :mod:`attnkern.ops.gating`).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .gating import BlockPasses, acc_dtype


def squeeze_excite(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    *,
    primitives=None,
    gate: Callable[[Tensor], Tensor] = torch.sigmoid,
    add_maxpool: bool = False,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    in_place: bool = False,
) -> Tuple[Tensor, Tensor]:
    """The fused SE block on a validated, dense x. Returns ``(out, gc)``, gc [B, C] in the
    accumulation dtype. ``mlp`` receives float32 (float64) pooled vectors [B, C].

    With ``residual`` (x's shape, dtype and layout), ``out = relu?(se(x) + residual)``: a
    residual block's add and activation in the apply pass (``gate_apply_residual``), with
    autograd: no pass of their own forward; backward, the ReLU's mask is the one pass they keep
    (as the ReLU's own backward). ``in_place`` (inference without autograd, in a block that owns
    x): the result written into x, no new big tensor."""
    acc = acc_dtype(x.dtype)
    passes = BlockPasses(primitives)
    mean, mx = passes.channel_stats(x)
    s = 0.5 * mean + 0.5 * mx if add_maxpool else mean
    gc = gate(mlp(s).to(acc))
    if residual is not None:
        return passes.gate_apply_residual(x, gc, None, residual, relu, in_place), gc
    return passes.gate_apply(x, gc, None), gc
