"""The fused CBAM block: three passes over x forward, three backward, one write of dx.

Forward (``pool_order``, ``gate``, the channel ``mlp`` and the ``spatial`` conv are the
caller's; only the passes over the big tensor are kernels):

    mean_c, max_c = channel_stats(x)                 1 read
    gc = gate(mlp(mean_c) + mlp(max_c))              PyTorch, [B, C]
    mean_s, max_s = spatial_stats(x, gc)             1 read
    gs = gate(spatial([mean_s; max_s]))              PyTorch, [B, H*W]
    out = gate_apply(x, gc, gs)                      1 read + 1 write

Backward (eager): autograd runs the three nodes in reverse. ``_Apply`` does pass A
(dgc_a, dgs; it keeps dout), ``_SpatialStats`` pass B (dgc_b; it keeps dmean_s, dmax_s), the
small PyTorch graphs in between give their parameters' gradients, and ``_ChannelStats``, which
autograd runs last, writes dx once in pass C from everything the other two kept. The three
nodes share a ``_Tape``; a token output of ``_ChannelStats`` feeds the other two, so autograd
always runs ``_ChannelStats`` after them, even when a gate is detached. Saved for backward: x
(one storage, saved by each node for autograd's in-place checks) and [B, C] / [B, HW] stats.

Under ``torch.compile`` the same kernels run as separate custom ops with their own autograd
formulas (:mod:`attnkern.ops.gating`), which the compiler can trace; each then writes its own
term of dx and the compiled graph adds them.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

from .gating import acc_dtype, dense, memory_format_of, run


class _Tape:
    """What the three nodes of one CBAM call hand each other during backward."""

    __slots__ = ("backend", "x_fmt", "dout", "gc", "gs", "smax", "scount", "dsmean", "dsmax")

    def __init__(self, backend: str):
        self.backend = backend
        self.clear()

    def clear(self):
        self.dout = self.gc = self.gs = None
        self.smax = self.scount = self.dsmean = self.dsmax = None


class _ChannelStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, tape: _Tape):
        mean, mx, cnt = run.channel_stats(x, tape.backend)
        token = x.new_zeros((), dtype=acc_dtype(x.dtype))
        ctx.tape = tape
        ctx.save_for_backward(x, mx, cnt)
        ctx.mark_non_differentiable(cnt)
        return mean, mx, cnt, token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dmean, dmax, _dcnt, _dtoken):
        x, mx, cnt = ctx.saved_tensors
        t: _Tape = ctx.tape
        spatial = t.dsmean is not None
        dx = run.gate_bwd_c(
            x, t.dout, t.gc, t.gs,
            t.smax if spatial else None, t.scount if spatial else None,
            t.dsmean, t.dsmax,
            mx, cnt, dmean, dmax, t.backend,
        )
        t.clear()
        return dx, None


class _SpatialStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gc: Tensor, token: Tensor, tape: _Tape):
        mean, mx, cnt = run.spatial_stats(x, gc, tape.backend)
        ctx.tape = tape
        ctx.save_for_backward(x, gc, mx, cnt)
        ctx.mark_non_differentiable(cnt)
        return mean, mx, cnt

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dmean, dmax, _dcnt):
        x, gc, mx, cnt = ctx.saved_tensors
        t: _Tape = ctx.tape
        dgc = None
        if ctx.needs_input_grad[1]:
            dgc = run.cbam_bwd_b(x, gc, mx, cnt, dmean, dmax, t.backend)
        if ctx.needs_input_grad[0]:  # dx is written once, by _ChannelStats
            t.gc, t.smax, t.scount, t.dsmean, t.dsmax = gc, mx, cnt, dmean, dmax
        return None, dgc, torch.zeros_like(gc[0, 0]), None


class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gc: Tensor, gs: Tensor, token: Tensor, tape: _Tape):
        out = run.gate_apply(x, gc, gs, tape.backend)
        ctx.tape = tape
        ctx.save_for_backward(x, gc, gs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, gc, gs = ctx.saved_tensors
        t: _Tape = ctx.tape
        need_dgc, need_dgs = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dgc = dgs = None
        if need_dgc or need_dgs:
            dgc, dgs = run.gate_bwd_a(dout, x, gc, gs, need_dgc, need_dgs, t.backend)
        if ctx.needs_input_grad[0]:  # dx is written once, by _ChannelStats
            t.dout, t.gc, t.gs = dense(dout, memory_format_of(x)), gc, gs
        return None, dgc, dgs, torch.zeros_like(gc[0, 0]), None


def cbam(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    *,
    backend: str,
    pool_order: str = "mean_max",
    gate: Callable[[Tensor], Tensor] = torch.sigmoid,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused CBAM block on an already validated, dense (:func:`dense`) ``x``. Returns ``(out, gc, gs)`` with gc
    [B, C] and gs [B, 1, H, W] in the accumulation dtype (float32; float64 for float64 x).

    ``mlp`` maps [N, C] -> [N, C]; ``spatial`` maps [B, 2, H, W] -> [B, 1, H, W]. They receive
    float32 statistics (cast them to their parameters' dtype if needed); their outputs are
    gated in float32.
    """
    B, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    compiled = torch.compiler.is_compiling()

    if compiled:
        mean_c, max_c, _ = torch.ops.attnkern.channel_stats(x, backend)
    else:
        tape = _Tape(backend)
        mean_c, max_c, _, token = _ChannelStats.apply(x, tape)
    logits = mlp(torch.cat([mean_c, max_c], dim=0)).to(acc)
    gc = gate(logits[:B] + logits[B:])

    if compiled:
        mean_s, max_s, _ = torch.ops.attnkern.spatial_stats(x, gc, backend)
    else:
        mean_s, max_s, _ = _SpatialStats.apply(x, gc, token, tape)
    maps = (mean_s, max_s) if pool_order == "mean_max" else (max_s, mean_s)
    s = torch.stack(maps, dim=1).view(B, 2, H, W)
    gs = gate(spatial(s).to(acc)).reshape(B, H * W)

    if compiled:
        out = torch.ops.attnkern.gate_apply(x, gc, gs, backend)
    else:
        out = _Apply.apply(x, gc, gs, token, tape)
    return out, gc, gs.view(B, 1, H, W)
