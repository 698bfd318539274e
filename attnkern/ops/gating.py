"""The pooled-gating primitives shared by CBAM, SE and BAM, as ``torch.library`` ops.

Nine primitives do every pass over the big tensor (see :mod:`attnkern.reference.gating` for
their math): ``channel_stats``, ``spatial_stats``, ``gate_apply`` (forward), ``gate_bwd_a``,
``cbam_bwd_b``, ``gate_bwd_c`` (backward), and BAM's ``bam_combine``, ``bam_combine_bwd``,
``bam_dx``. Each runs on one of three backends with the same
signature: the C++ extension (CPU), Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``) and the
PyTorch reference. The backend is chosen once per op call by :func:`attnkern._backend.pick`
and passed down as a string, so the three can be compared on the same inputs.

Two ways to call them:
- ``run.<name>(...)``: plain calls, used inside the fused autograd Functions of the blocks
  (eager mode), where one backward pass writes the input gradient once.
- ``torch.ops.attnkern.<name>``: the same functions registered as custom ops with fake
  (meta) implementations, and autograd formulas for the three forward primitives, so that
  ``torch.compile(fullgraph=True)`` traces a model that contains them without a graph break.

Three eager autograd nodes (``ChannelStatsNode``, ``SpatialStatsNode``, ``ApplyNode``) chain
the forward primitives of a block so that its backward writes dx once: ``ApplyNode`` does pass
A (gate gradients) and keeps dout, ``SpatialStatsNode`` pass B (the channel gate's gradient
through the spatial statistics) and keeps its statistics' gradients, and ``ChannelStatsNode``,
which autograd runs last, writes dx in pass C from everything the others kept. They share a
``Tape``; a token output of ``ChannelStatsNode`` feeds the other two, so autograd always runs
it after them, even when a gate is detached. CBAM uses all three, SE the first and the last.

Layouts: kernels take NCHW-contiguous or channels_last-contiguous tensors without a copy;
any other strides (a sliced view) are first made dense in the layout they resemble — one copy,
the only one. Big outputs keep that layout.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend, _cpu
from ..reference import gating as _ref

__all__ = ["acc_dtype", "dense", "memory_format_of", "pick_backend", "run", "FLOAT_DTYPES",
           "Tape", "ChannelStatsNode", "SpatialStatsNode", "ApplyNode", "BamCombineNode"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
acc_dtype = _ref.acc_dtype


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last if x's channels are its innermost dimension (dense or a view of such a
    tensor), else contiguous. The layout a non-dense x is copied into, and that outputs keep."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    sizes, strides = x.shape, x.stride()
    others = [strides[d] for d in (2, 3) if sizes[d] > 1]
    if sizes[1] > 1 and others and strides[1] < min(others):
        return torch.channels_last
    return torch.contiguous_format


def dense(t: Tensor, fmt: Optional[torch.memory_format] = None) -> Tensor:
    """``t`` if it is dense in ``fmt`` (default: the layout it resembles), else a dense copy."""
    fmt = fmt or memory_format_of(t)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _triton_dtypes() -> Sequence[torch.dtype]:
    from ..triton import gating as tg

    return getattr(tg, "SUPPORTED_DTYPES", FLOAT_DTYPES)


def pick_backend(op: str, x: Tensor) -> str:
    """The backend the gating primitives of ``op`` run on for input ``x``."""

    def supports(backend: str) -> Optional[str]:
        if backend == "triton" and x.dtype not in _triton_dtypes():
            return f"the triton gating kernels do not take {x.dtype}"
        return None

    return _backend.pick(op, x.device, supports)


def _module(backend: str) -> ModuleType:
    if backend == "cpu":
        return _cpu.require()
    if backend == "triton":
        from ..triton import gating as tg

        return tg
    if backend == "reference":
        return _ref
    raise ValueError(f"unknown backend {backend!r}")


class _Run:
    """Plain (non-dispatcher) calls of the primitives on a named backend; big tensors are made
    dense here, so every backend sees NCHW- or channels_last-contiguous inputs."""

    @staticmethod
    def channel_stats(x: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
        return _module(backend).channel_stats(dense(x))

    @staticmethod
    def spatial_stats(x: Tensor, gc: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
        return _module(backend).spatial_stats(dense(x), gc.contiguous())

    @staticmethod
    def gate_apply(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], backend: str) -> Tensor:
        return _module(backend).gate_apply(dense(x), _c(gc), _c(gs))

    @staticmethod
    def gate_bwd_a(dout, x, gc, gs, need_dgc: bool, need_dgs: bool, backend: str):
        x = dense(x)
        return _module(backend).gate_bwd_a(dense(dout, memory_format_of(x)), x, _c(gc), _c(gs),
                                           need_dgc, need_dgs)

    @staticmethod
    def cbam_bwd_b(x, gc, smax, scount, dsmean, dsmax, backend: str) -> Tensor:
        return _module(backend).cbam_bwd_b(dense(x), gc.contiguous(), smax.contiguous(),
                                           scount.contiguous(), dsmean.contiguous(), dsmax.contiguous())

    @staticmethod
    def gate_bwd_c(x, dout, gc, gs, smax, scount, dsmean, dsmax, cmax, ccount, dcmean, dcmax,
                   backend: str) -> Tensor:
        x = dense(x)
        dout = dense(dout, memory_format_of(x)) if dout is not None else None
        return _module(backend).gate_bwd_c(x, dout, _c(gc), _c(gs), _c(smax), _c(scount), _c(dsmean),
                                           _c(dsmax), _c(cmax), _c(ccount), _c(dcmean), _c(dcmax))


    @staticmethod
    def bam_combine(x, mc, ms, product: bool, backend: str) -> Tensor:
        return _module(backend).bam_combine(dense(x), mc.contiguous(), ms.contiguous(), product)

    @staticmethod
    def bam_combine_bwd(dout, x, mc, ms, product: bool, backend: str):
        x = dense(x)
        return _module(backend).bam_combine_bwd(dense(dout, memory_format_of(x)), x, mc.contiguous(),
                                                ms.contiguous(), product)

    @staticmethod
    def bam_dx(x, dout, mc, ms, product: bool, dcmean, backend: str) -> Tensor:
        x = dense(x)
        dout = dense(dout, memory_format_of(x)) if dout is not None else None
        return _module(backend).bam_dx(x, dout, mc.contiguous(), ms.contiguous(), product, _c(dcmean))


run = _Run()


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# ----------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------

def _stats_like(x: Tensor, n: int) -> Tuple[Tensor, Tensor, Tensor]:
    B = x.shape[0]
    a = acc_dtype(x.dtype)
    return (x.new_empty((B, n), dtype=a), x.new_empty((B, n), dtype=a),
            x.new_empty((B, n), dtype=torch.int32))


def _big_like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


@torch.library.custom_op("attnkern::channel_stats", mutates_args=())
def channel_stats(x: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, max and tie count over H*W per (b, c)."""
    return run.channel_stats(x, backend)


@channel_stats.register_fake
def _(x, backend):
    return _stats_like(x, x.shape[1])


@torch.library.custom_op("attnkern::spatial_stats", mutates_args=())
def spatial_stats(x: Tensor, gc: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, max and tie count over C of x * gc per (b, hw)."""
    return run.spatial_stats(x, gc, backend)


@spatial_stats.register_fake
def _(x, gc, backend):
    return _stats_like(x, x.shape[2] * x.shape[3])


@torch.library.custom_op("attnkern::gate_apply", mutates_args=())
def gate_apply(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], backend: str) -> Tensor:
    """x * gc[b, c] * gs[b, hw]."""
    return run.gate_apply(x, gc, gs, backend)


@gate_apply.register_fake
def _(x, gc, gs, backend):
    return _big_like(x)


@torch.library.custom_op("attnkern::gate_bwd_a", mutates_args=())
def gate_bwd_a(dout: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
               backend: str) -> Tuple[Tensor, Tensor]:
    """(dgc, dgs) of out = x * gc * gs; a gate that is None gets an empty gradient."""
    dgc, dgs = run.gate_bwd_a(dout, x, gc, gs, gc is not None, gs is not None, backend)
    return (dgc if dgc is not None else x.new_empty(0, dtype=acc_dtype(x.dtype)),
            dgs if dgs is not None else x.new_empty(0, dtype=acc_dtype(x.dtype)))


@gate_bwd_a.register_fake
def _(dout, x, gc, gs, backend):
    B, C, H, W = x.shape
    a = acc_dtype(x.dtype)
    return (x.new_empty((B, C) if gc is not None else (0,), dtype=a),
            x.new_empty((B, H * W) if gs is not None else (0,), dtype=a))


@torch.library.custom_op("attnkern::cbam_bwd_b", mutates_args=())
def cbam_bwd_b(x: Tensor, gc: Tensor, smax: Tensor, scount: Tensor, dsmean: Tensor,
               dsmax: Tensor, backend: str) -> Tensor:
    """Channel-gate gradient through the spatial statistics of x * gc."""
    return run.cbam_bwd_b(x, gc, smax, scount, dsmean, dsmax, backend)


@cbam_bwd_b.register_fake
def _(x, gc, smax, scount, dsmean, dsmax, backend):
    return x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))


@torch.library.custom_op("attnkern::gate_bwd_c", mutates_args=())
def gate_bwd_c(x: Tensor, dout: Optional[Tensor], gc: Optional[Tensor], gs: Optional[Tensor],
               smax: Optional[Tensor], scount: Optional[Tensor], dsmean: Optional[Tensor],
               dsmax: Optional[Tensor], cmax: Optional[Tensor], ccount: Optional[Tensor],
               dcmean: Optional[Tensor], dcmax: Optional[Tensor], backend: str) -> Tensor:
    """The input gradient of a gating block, every term optional (see the reference)."""
    return run.gate_bwd_c(x, dout, gc, gs, smax, scount, dsmean, dsmax, cmax, ccount, dcmean,
                          dcmax, backend)


@gate_bwd_c.register_fake
def _(x, dout, gc, gs, smax, scount, dsmean, dsmax, cmax, ccount, dcmean, dcmax, backend):
    return _big_like(x)


@torch.library.custom_op("attnkern::bam_combine", mutates_args=())
def bam_combine(x: Tensor, mc: Tensor, ms: Tensor, product: bool, backend: str) -> Tensor:
    """BAM's x * (1 + sigmoid(mc[b, c] + ms[b, hw])) (or mc * ms with ``product``)."""
    return run.bam_combine(x, mc, ms, product, backend)


@bam_combine.register_fake
def _(x, mc, ms, product, backend):
    return _big_like(x)


@torch.library.custom_op("attnkern::bam_combine_bwd", mutates_args=())
def bam_combine_bwd(dout: Tensor, x: Tensor, mc: Tensor, ms: Tensor, product: bool,
                    backend: str) -> Tuple[Tensor, Tensor]:
    """(dmc, dms) of BAM's combine."""
    return run.bam_combine_bwd(dout, x, mc, ms, product, backend)


@bam_combine_bwd.register_fake
def _(dout, x, mc, ms, product, backend):
    return torch.empty_like(mc), torch.empty_like(ms)


@torch.library.custom_op("attnkern::bam_dx", mutates_args=())
def bam_dx(x: Tensor, dout: Optional[Tensor], mc: Tensor, ms: Tensor, product: bool,
           dcmean: Optional[Tensor], backend: str) -> Tensor:
    """dx = dout * (1 + sigmoid(z)) + dcmean / HW."""
    return run.bam_dx(x, dout, mc, ms, product, dcmean, backend)


@bam_dx.register_fake
def _(x, dout, mc, ms, product, dcmean, backend):
    return _big_like(x)


# Autograd of the three forward primitives, each on its own (the compiled path). Every input
# gradient is one gate_bwd_c term; autograd adds them up.

def _channel_stats_setup(ctx, inputs, output):
    x, backend = inputs
    _, mx, cnt = output
    ctx.backend = backend
    ctx.save_for_backward(x, mx, cnt)


def _channel_stats_backward(ctx, dmean, dmax, dcount):
    x, mx, cnt = ctx.saved_tensors
    dx = torch.ops.attnkern.gate_bwd_c(x, None, None, None, None, None, None, None, mx, cnt,
                                       dmean, dmax, ctx.backend)
    return dx, None


channel_stats.register_autograd(_channel_stats_backward, setup_context=_channel_stats_setup)


def _spatial_stats_setup(ctx, inputs, output):
    x, gc, backend = inputs
    _, mx, cnt = output
    ctx.backend = backend
    ctx.save_for_backward(x, gc, mx, cnt)


def _spatial_stats_backward(ctx, dmean, dmax, dcount):
    x, gc, mx, cnt = ctx.saved_tensors
    dx = dgc = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.attnkern.gate_bwd_c(x, None, gc, None, mx, cnt, dmean, dmax, None, None,
                                           None, None, ctx.backend)
    if ctx.needs_input_grad[1]:
        dgc = torch.ops.attnkern.cbam_bwd_b(x, gc, mx, cnt, dmean, dmax, ctx.backend)
    return dx, dgc, None


spatial_stats.register_autograd(_spatial_stats_backward, setup_context=_spatial_stats_setup)


def _gate_apply_setup(ctx, inputs, output):
    x, gc, gs, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, gc, gs)


def _gate_apply_backward(ctx, dout):
    x, gc, gs = ctx.saved_tensors
    dx = dgc = dgs = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.attnkern.gate_bwd_c(x, dout, gc, gs, None, None, None, None, None, None,
                                           None, None, ctx.backend)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dgc, dgs = torch.ops.attnkern.gate_bwd_a(dout, x, gc, gs, ctx.backend)
        dgc = dgc if gc is not None and ctx.needs_input_grad[1] else None
        dgs = dgs if gs is not None and ctx.needs_input_grad[2] else None
    return dx, dgc, dgs, None


gate_apply.register_autograd(_gate_apply_backward, setup_context=_gate_apply_setup)


def _bam_combine_setup(ctx, inputs, output):
    x, mc, ms, product, backend = inputs
    ctx.product, ctx.backend = product, backend
    ctx.save_for_backward(x, mc, ms)


def _bam_combine_backward(ctx, dout):
    x, mc, ms = ctx.saved_tensors
    dx = dmc = dms = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.attnkern.bam_dx(x, dout, mc, ms, ctx.product, None, ctx.backend)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dmc, dms = torch.ops.attnkern.bam_combine_bwd(dout, x, mc, ms, ctx.product, ctx.backend)
    return dx, dmc, dms, None, None


bam_combine.register_autograd(_bam_combine_backward, setup_context=_bam_combine_setup)


# ----------------------------------------------------------------------------------------
# Eager autograd nodes of the fused blocks
# ----------------------------------------------------------------------------------------

class Tape:
    """What the three nodes of one CBAM call hand each other during backward."""

    __slots__ = ("backend", "dout", "gc", "gs", "smax", "scount", "dsmean", "dsmax", "bam")

    def __init__(self, backend: str):
        self.backend = backend
        self.clear()

    def clear(self):
        self.dout = self.gc = self.gs = None
        self.smax = self.scount = self.dsmean = self.dsmax = None
        self.bam = None  # (mc, ms, product) when the block is BAM


class ChannelStatsNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, tape: Tape):
        ctx.set_materialize_grads(False)  # an unused statistic costs nothing in pass C
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
        t: Tape = ctx.tape
        if t.bam is not None:
            mc, ms, product = t.bam
            dx = run.bam_dx(x, t.dout, mc, ms, product, dmean, t.backend)
            t.clear()
            return dx, None
        spatial = t.dsmean is not None
        dx = run.gate_bwd_c(
            x, t.dout, t.gc, t.gs,
            t.smax if spatial else None, t.scount if spatial else None,
            t.dsmean, t.dsmax,
            mx if dmax is not None else None, cnt if dmax is not None else None,
            dmean, dmax, t.backend,
        )
        t.clear()
        return dx, None


class SpatialStatsNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gc: Tensor, token: Tensor, tape: Tape):
        ctx.set_materialize_grads(False)
        mean, mx, cnt = run.spatial_stats(x, gc, tape.backend)
        ctx.tape = tape
        ctx.save_for_backward(x, gc, mx, cnt)
        ctx.mark_non_differentiable(cnt)
        return mean, mx, cnt

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dmean, dmax, _dcnt):
        x, gc, mx, cnt = ctx.saved_tensors
        t: Tape = ctx.tape
        dmean = dmean if dmean is not None else torch.zeros_like(mx)
        dmax = dmax if dmax is not None else torch.zeros_like(mx)
        dgc = None
        if ctx.needs_input_grad[1]:
            dgc = run.cbam_bwd_b(x, gc, mx, cnt, dmean, dmax, t.backend)
        if ctx.needs_input_grad[0]:  # dx is written once, by ChannelStatsNode
            t.gc, t.smax, t.scount, t.dsmean, t.dsmax = gc, mx, cnt, dmean, dmax
        return None, dgc, torch.zeros_like(gc[0, 0]), None


class ApplyNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gc: Tensor, gs: Tensor, token: Tensor, tape: Tape):
        out = run.gate_apply(x, gc, gs, tape.backend)
        ctx.tape = tape
        ctx.save_for_backward(x, gc, gs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, gc, gs = ctx.saved_tensors
        t: Tape = ctx.tape
        need_dgc, need_dgs = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dgc = dgs = None
        if need_dgc or need_dgs:
            dgc, dgs = run.gate_bwd_a(dout, x, gc, gs, need_dgc, need_dgs, t.backend)
        if ctx.needs_input_grad[0]:  # dx is written once, by ChannelStatsNode
            t.dout, t.gc, t.gs = dense(dout, memory_format_of(x)), gc, gs
        return None, dgc, dgs, torch.zeros_like(gc[0, 0]), None



class BamCombineNode(torch.autograd.Function):
    """BAM's combine; its backward computes the logits' gradients and leaves dx to
    ``ChannelStatsNode``, which writes dout * (1 + sigmoid(z)) + dmean / HW in one pass."""

    @staticmethod
    def forward(ctx, x: Tensor, mc: Tensor, ms: Tensor, token: Tensor, tape: Tape, product: bool):
        out = run.bam_combine(x, mc, ms, product, tape.backend)
        ctx.tape, ctx.product = tape, product
        ctx.save_for_backward(x, mc, ms)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, mc, ms = ctx.saved_tensors
        t: Tape = ctx.tape
        dmc = dms = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dmc, dms = run.bam_combine_bwd(dout, x, mc, ms, ctx.product, t.backend)
        if ctx.needs_input_grad[0]:
            t.dout, t.bam = dense(dout, memory_format_of(x)), (mc, ms, ctx.product)
        return None, dmc, dms, torch.zeros_like(mc[0, 0]), None, None
