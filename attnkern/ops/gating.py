"""The pooled-gating primitives shared by CBAM, SE and BAM, as ``attnkern::`` ops of PyTorch's
dispatcher: one schema each, no backend argument.

Ten primitives do every pass over the big tensor (their math: :mod:`attnkern.reference.gating`):

==========================  ==============================================================
forward                     ``channel_stats``, ``spatial_stats``, ``gate_apply``, ``bam_combine``,
                            ``gate_apply_residual``: relu?(x * gc * gs + residual), the gate
                            with a residual block's add and activation
inference, in place         ``gate_apply_residual_``: the same written into x (no gradient)
gradients of small inputs   ``gate_apply_backward`` (the gates), ``spatial_stats_backward``
                            (the channel gate through the spatial statistics),
                            ``bam_combine_backward`` (BAM's logits)
gradient of x               ``gating_input_grad`` (CBAM, SE), ``bam_input_grad`` (BAM)
==========================  ==============================================================

Where each runs is the dispatcher's choice, by the device of the tensors:

- CPU: the C++ kernels, registered for the CPU key from C++ (csrc/statistics.cpp, gate.cpp,
  bam.cpp, which also define the schemas; loaded by :mod:`attnkern._cpu`);
- CUDA: the Triton kernels (:mod:`attnkern.triton.gating`), registered here for the CUDA key;
- anything else, or CPU when the C++ kernels are not built: the reference, registered as the
  ``CompositeExplicitAutograd`` kernel.

Fake (meta) kernels make every op traceable, and the five forward primitives carry autograd
formulas, so ``torch.compile(fullgraph=True)`` and ``torch.export`` take a model that calls
them; an exported graph names the ops, not a backend, so it runs on either device.

:class:`Primitives` is what the fused blocks call: the ops of one kernel set, with big tensors
made dense (NCHW or channels_last, the layout they resemble) and small ones contiguous on the
way in. :data:`DISPATCHER` goes through the dispatcher; tests hand the blocks
``Primitives(attnkern.triton.gating)`` to run the Triton kernels on CPU tensors under Triton's
interpreter, or ``Primitives(attnkern.reference.gating)`` (see :func:`primitives_for`).

Eager blocks chain three autograd nodes (``ChannelStatsNode``, ``SpatialStatsNode``,
``ApplyNode`` or ``ApplyResidualNode``, or ``BamCombineNode``) so that the backward pass writes
the input gradient once: ``ApplyNode`` computes the gates' gradients and keeps grad_out, ``SpatialStatsNode`` the
channel gate's gradient through the spatial statistics, and ``ChannelStatsNode``, which
autograd runs last, writes dx from everything the others kept (a shared ``Tape``; a token
output of ``ChannelStatsNode`` feeds the others, so autograd always runs it after them).
"""
from __future__ import annotations

import contextlib
import importlib.util
from types import ModuleType
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend, _cpu
from ..reference import gating as _ref

__all__ = ["acc_dtype", "dense", "memory_format_of", "pointwise_projection", "pick_backend", "primitives_for",
           "Primitives", "DISPATCHER", "FLOAT_DTYPES", "OPS", "Tape", "ChannelStatsNode", "SpatialStatsNode",
           "ApplyNode", "ApplyResidualNode", "BamCombineNode", "BlockPasses"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
acc_dtype = _ref.acc_dtype

#: The schemas of the ops. The C++ files define the same; these are used only where the C++
#: kernels are not built (a test checks that the two agree).
SCHEMAS = {
    "channel_stats": "(Tensor x) -> (Tensor, Tensor, Tensor)",
    "spatial_stats": "(Tensor x, Tensor gc) -> (Tensor, Tensor, Tensor)",
    "spatial_stats_backward": "(Tensor x, Tensor gc, Tensor smax, Tensor scount, Tensor grad_smean, "
                              "Tensor grad_smax) -> Tensor",
    "gate_apply": "(Tensor x, Tensor? gc, Tensor? gs) -> Tensor",
    "gate_apply_residual": "(Tensor x, Tensor? gc, Tensor? gs, Tensor residual, bool relu) -> Tensor",
    "gate_apply_residual_": "(Tensor(a!) x, Tensor? gc, Tensor? gs, Tensor residual, bool relu) -> Tensor(a!)",
    "gate_apply_backward": "(Tensor grad_out, Tensor x, Tensor? gc, Tensor? gs, bool need_grad_gc, "
                           "bool need_grad_gs) -> (Tensor, Tensor)",
    "gating_input_grad": "(Tensor x, Tensor? grad_out, Tensor? gc, Tensor? gs, Tensor? smax, "
                         "Tensor? scount, Tensor? grad_smean, Tensor? grad_smax, Tensor? cmax, "
                         "Tensor? ccount, Tensor? grad_cmean, Tensor? grad_cmax) -> Tensor",
    "bam_combine": "(Tensor x, Tensor mc, Tensor ms, bool product) -> Tensor",
    "bam_combine_backward": "(Tensor grad_out, Tensor x, Tensor mc, Tensor ms, bool product) "
                            "-> (Tensor, Tensor)",
    "bam_input_grad": "(Tensor x, Tensor? grad_out, Tensor mc, Tensor ms, bool product, "
                      "Tensor? grad_cmean, Tensor? grad_proj=None, Tensor? proj_weight=None) -> Tensor",
}
OPS = tuple(SCHEMAS)


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


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def pointwise_projection(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``conv2d(x, weight, bias)`` for a 1x1 weight [R, C, 1, 1] and x [B, C, H, W] dense in NCHW
    or channels_last, as a matrix product over x's own memory: NCHW ``W @ x[b]`` with x[b]
    viewed [C, H*W] (``torch.baddbmm``, the weight broadcast over the batch), channels_last x's
    [B*H*W, C] rows times W^T (``torch.addmm``). The same sums as the convolution in another
    order; the output [B, R, H, W] has x's layout. Autograd works through it."""
    B, C, H, W = x.shape
    R = weight.shape[0]
    w = weight.reshape(R, C)
    if memory_format_of(x) == torch.channels_last:
        h = torch.nn.functional.linear(x.permute(0, 2, 3, 1).reshape(B * H * W, C), w, bias)
        return h.view(B, H, W, R).permute(0, 3, 1, 2)
    xs = x.reshape(B, C, H * W)
    we = w.unsqueeze(0).expand(B, R, C)
    h = torch.bmm(we, xs) if bias is None else torch.baddbmm(bias.view(1, R, 1).expand(B, R, 1), we, xs)
    return h.view(B, R, H, W)


def pointwise_projection_backward_(dx: Optional[Tensor], x: Tensor, weight: Tensor, grad_h: Tensor,
                                   need_weight: bool, need_bias: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The backward of :func:`pointwise_projection`: adds its input gradient ``W^T grad_h`` into
    dx in place (no x-sized tensor of its own: ``baddbmm_`` / ``addmm_`` with beta 1; dx is
    dense in x's layout, as every input-gradient primitive writes it) and returns the weight's
    and the bias's gradients."""
    B, C, H, W = x.shape
    R = weight.shape[0]
    w = weight.reshape(R, C)
    grad_w = None
    if memory_format_of(x) == torch.channels_last:
        g = grad_h.permute(0, 2, 3, 1).reshape(B * H * W, R)
        if dx is not None:
            dx.permute(0, 2, 3, 1).view(B * H * W, C).addmm_(g, w)
        if need_weight:
            grad_w = g.t().mm(x.permute(0, 2, 3, 1).reshape(B * H * W, C))
    else:
        g = grad_h.reshape(B, R, H * W)
        if dx is not None:
            dx.view(B, C, H * W).baddbmm_(w.t().unsqueeze(0).expand(B, C, R), g)
        if need_weight:
            grad_w = torch.bmm(g, x.reshape(B, C, H * W).transpose(1, 2)).sum(0)
    grad_b = grad_h.sum((0, 2, 3)) if need_bias else None
    return (grad_w.view_as(weight) if grad_w is not None else None), grad_b


# ----------------------------------------------------------------------------------------
# the ops: schemas, kernels per device, fake kernels
# ----------------------------------------------------------------------------------------

def define_ops(schemas, reference: ModuleType) -> torch.library.Library:
    """Defines each ``attnkern::`` op of ``schemas`` (name -> schema) that the C++ library
    (loaded first: it defines the same schemas with its CPU kernels) has not, and registers
    ``reference``'s function of the same name as the op's ``CompositeExplicitAutograd`` kernel
    (every device without a kernel of its own). Returns the fragment, for more registrations."""
    _cpu.extension()
    lib = torch.library.Library("attnkern", "FRAGMENT")
    for name, schema in schemas.items():
        if not hasattr(torch.ops.attnkern, name):
            lib.define(name + schema)
        lib.impl(name, getattr(reference, name), "CompositeExplicitAutograd")
    return lib


_lib = define_ops(SCHEMAS, _ref)


def _triton_kernel(name: str):
    def kernel(*args):
        from ..triton import gating as tg

        return getattr(tg, name)(*args)

    kernel.__name__ = name
    return kernel


if importlib.util.find_spec("triton") is not None:
    for _name in OPS:
        _lib.impl(_name, _triton_kernel(_name), "CUDA")


def _stats_like(x: Tensor, n: int) -> Tuple[Tensor, Tensor, Tensor]:
    B = x.shape[0]
    a = acc_dtype(x.dtype)
    return (x.new_empty((B, n), dtype=a), x.new_empty((B, n), dtype=a),
            x.new_empty((B, n), dtype=torch.int32))


def _big_like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _small_like(x: Tensor, n: int) -> Tensor:
    return x.new_empty((x.shape[0], n), dtype=acc_dtype(x.dtype))


@torch.library.register_fake("attnkern::channel_stats", lib=_lib)
def _(x):
    return _stats_like(x, x.shape[1])


@torch.library.register_fake("attnkern::spatial_stats", lib=_lib)
def _(x, gc):
    return _stats_like(x, x.shape[2] * x.shape[3])


@torch.library.register_fake("attnkern::spatial_stats_backward", lib=_lib)
def _(x, gc, smax, scount, grad_smean, grad_smax):
    return _small_like(x, x.shape[1])


@torch.library.register_fake("attnkern::gate_apply", lib=_lib)
def _(x, gc, gs):
    return _big_like(x)


@torch.library.register_fake("attnkern::gate_apply_residual", lib=_lib)
def _(x, gc, gs, residual, relu):
    return _big_like(x)


@torch.library.register_fake("attnkern::gate_apply_residual_", lib=_lib)
def _(x, gc, gs, residual, relu):
    return x


@torch.library.register_fake("attnkern::gate_apply_backward", lib=_lib)
def _(grad_out, x, gc, gs, need_grad_gc, need_grad_gs):
    B, C, H, W = x.shape
    a = acc_dtype(x.dtype)
    return (x.new_empty((B, C) if need_grad_gc else (0,), dtype=a),
            x.new_empty((B, H * W) if need_grad_gs else (0,), dtype=a))


@torch.library.register_fake("attnkern::gating_input_grad", lib=_lib)
def _(x, grad_out, gc, gs, smax, scount, grad_smean, grad_smax, cmax, ccount, grad_cmean, grad_cmax):
    return _big_like(x)


@torch.library.register_fake("attnkern::bam_combine", lib=_lib)
def _(x, mc, ms, product):
    return _big_like(x)


@torch.library.register_fake("attnkern::bam_combine_backward", lib=_lib)
def _(grad_out, x, mc, ms, product):
    return torch.empty_like(mc), torch.empty_like(ms)


@torch.library.register_fake("attnkern::bam_input_grad", lib=_lib)
def _(x, grad_out, mc, ms, product, grad_cmean, grad_proj=None, proj_weight=None):
    return _big_like(x)


# ----------------------------------------------------------------------------------------
# Primitives: what the blocks call
# ----------------------------------------------------------------------------------------

class Primitives:
    """The ten primitives of one kernel set (``torch.ops.attnkern``, or a module with the same
    functions: :mod:`attnkern.triton.gating`, :mod:`attnkern.reference.gating`), with big
    tensors made dense in x's layout and small ones contiguous first: every kernel sees NCHW-
    or channels_last-contiguous inputs."""

    def __init__(self, kernels):
        self.kernels = kernels

    def channel_stats(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.kernels.channel_stats(dense(x))

    def spatial_stats(self, x: Tensor, gc: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.kernels.spatial_stats(dense(x), gc.contiguous())

    def spatial_stats_backward(self, x, gc, smax, scount, grad_smean, grad_smax) -> Tensor:
        return self.kernels.spatial_stats_backward(dense(x), gc.contiguous(), smax.contiguous(),
                                                   scount.contiguous(), grad_smean.contiguous(),
                                                   grad_smax.contiguous())

    def gate_apply(self, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor]) -> Tensor:
        return self.kernels.gate_apply(dense(x), _c(gc), _c(gs))

    def gate_apply_residual(self, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], residual: Tensor,
                            relu: bool) -> Tensor:
        x = dense(x)
        return self.kernels.gate_apply_residual(x, _c(gc), _c(gs), dense(residual, memory_format_of(x)), relu)

    def gate_apply_residual_(self, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], residual: Tensor,
                             relu: bool) -> Tensor:
        """In place on x, which must be dense already (NCHW or channels_last)."""
        return self.kernels.gate_apply_residual_(x, _c(gc), _c(gs), dense(residual, memory_format_of(x)), relu)

    def gate_apply_backward(self, grad_out, x, gc, gs, need_grad_gc: bool, need_grad_gs: bool):
        x = dense(x)
        return self.kernels.gate_apply_backward(dense(grad_out, memory_format_of(x)), x, _c(gc), _c(gs),
                                                need_grad_gc, need_grad_gs)

    def gating_input_grad(self, x, grad_out, gc, gs, smax, scount, grad_smean, grad_smax, cmax, ccount,
                          grad_cmean, grad_cmax) -> Tensor:
        x = dense(x)
        grad_out = dense(grad_out, memory_format_of(x)) if grad_out is not None else None
        return self.kernels.gating_input_grad(x, grad_out, _c(gc), _c(gs), _c(smax), _c(scount),
                                              _c(grad_smean), _c(grad_smax), _c(cmax), _c(ccount),
                                              _c(grad_cmean), _c(grad_cmax))

    def bam_combine(self, x, mc, ms, product: bool) -> Tensor:
        return self.kernels.bam_combine(dense(x), mc.contiguous(), ms.contiguous(), product)

    def bam_combine_backward(self, grad_out, x, mc, ms, product: bool):
        x = dense(x)
        return self.kernels.bam_combine_backward(dense(grad_out, memory_format_of(x)), x, mc.contiguous(),
                                                 ms.contiguous(), product)

    def bam_input_grad(self, x, grad_out, mc, ms, product: bool, grad_cmean, grad_proj=None,
                       proj_weight=None) -> Tensor:
        """``grad_proj`` [B, R, H, W] and ``proj_weight`` [R, C, 1, 1] or [R, C]: the spatial
        branch's 1x1 projection of x and its output's gradient, whose input gradient the pass
        adds (see :func:`pointwise_projection`)."""
        x = dense(x)
        fmt = memory_format_of(x)
        grad_out = dense(grad_out, fmt) if grad_out is not None else None
        if grad_proj is None:
            return self.kernels.bam_input_grad(x, grad_out, mc.contiguous(), ms.contiguous(), product,
                                               _c(grad_cmean))
        acc = acc_dtype(x.dtype)
        grad_proj = dense(grad_proj.to(acc), fmt)
        proj_weight = proj_weight.detach().reshape(proj_weight.shape[0], -1).to(acc).contiguous()
        return self.kernels.bam_input_grad(x, grad_out, mc.contiguous(), ms.contiguous(), product,
                                           _c(grad_cmean), grad_proj, proj_weight)


#: The primitives through the dispatcher: C++ on CPU, Triton on CUDA, the reference elsewhere.
DISPATCHER = Primitives(torch.ops.attnkern)
_TRITON_ON_CPU: Optional[Primitives] = None


def _triton_dtypes() -> Sequence[torch.dtype]:
    from ..triton import gating as tg

    return getattr(tg, "SUPPORTED_DTYPES", FLOAT_DTYPES)


def pick_backend(op: str, x: Tensor) -> str:
    """The backend the gating primitives of ``op`` run on for input ``x`` (see
    :func:`attnkern._backend.pick`): ``'reference'`` runs the reference block instead (also
    while ``torch.compile`` traces, on CPU by default: see :mod:`attnkern._backend`)."""

    def supports(backend: str) -> Optional[str]:
        if backend == "triton" and x.dtype not in _triton_dtypes():
            return f"the triton gating kernels do not take {x.dtype}"
        return None

    return _backend.pick(op, x.device, supports, decomposable=True)


def primitives_for(backend: str, x: Tensor) -> Primitives:
    """The primitives a fused block runs for ``backend`` (from :func:`pick_backend`, not
    ``'reference'``) on ``x``: the dispatcher, except for the test-facing override
    ``ATTNKERN_BACKEND=triton`` on CPU tensors under ``TRITON_INTERPRET=1``, which runs the
    Triton kernels in Triton's interpreter."""
    global _TRITON_ON_CPU
    if backend == "triton" and x.device.type == "cpu":
        if _TRITON_ON_CPU is None:
            from ..triton import gating as tg

            _TRITON_ON_CPU = Primitives(tg)
        return _TRITON_ON_CPU
    return DISPATCHER


def as_primitives(kernels) -> Primitives:
    """``kernels`` (None: :data:`DISPATCHER`; a module of primitive functions) as Primitives."""
    if kernels is None:
        return DISPATCHER
    return kernels if isinstance(kernels, Primitives) else Primitives(kernels)


# ----------------------------------------------------------------------------------------
# autograd formulas of the forward primitives (used where the fused nodes are not: under
# torch.compile and torch.export). Every input gradient is one gating_input_grad term;
# autograd adds them up.
# ----------------------------------------------------------------------------------------

_ops = torch.ops.attnkern


def _channel_stats_setup(ctx, inputs, output):
    (x,) = inputs
    _, mx, cnt = output
    ctx.save_for_backward(x, mx, cnt)


def _channel_stats_backward(ctx, grad_mean, grad_max, grad_count):
    x, mx, cnt = ctx.saved_tensors
    return _ops.gating_input_grad(x, None, None, None, None, None, None, None, mx, cnt,
                                  _c(grad_mean), _c(grad_max))


torch.library.register_autograd("attnkern::channel_stats", _channel_stats_backward,
                                setup_context=_channel_stats_setup, lib=_lib)


def _spatial_stats_setup(ctx, inputs, output):
    x, gc = inputs
    _, mx, cnt = output
    ctx.save_for_backward(x, gc, mx, cnt)


def _spatial_stats_backward(ctx, grad_mean, grad_max, grad_count):
    x, gc, mx, cnt = ctx.saved_tensors
    grad_x = grad_gc = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.gating_input_grad(x, None, gc, None, mx, cnt, _c(grad_mean), _c(grad_max), None, None,
                                        None, None)
    if ctx.needs_input_grad[1]:
        grad_gc = _ops.spatial_stats_backward(x, gc, mx, cnt, grad_mean.contiguous(), grad_max.contiguous())
    return grad_x, grad_gc


torch.library.register_autograd("attnkern::spatial_stats", _spatial_stats_backward,
                                setup_context=_spatial_stats_setup, lib=_lib)


def _gate_apply_setup(ctx, inputs, output):
    x, gc, gs = inputs
    ctx.save_for_backward(x, gc, gs)


def _gated_grads(ctx, grad_out: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor]):
    """The gradients of x, gc and gs of ``x * gc * gs`` for a dense grad_out (None where the
    input needs none): the formula of gate_apply, and of gate_apply_residual after its mask."""
    grad_x = grad_gc = grad_gs = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.gating_input_grad(x, grad_out, gc, gs, None, None, None, None, None, None, None, None)
    need_gc = gc is not None and ctx.needs_input_grad[1]
    need_gs = gs is not None and ctx.needs_input_grad[2]
    if need_gc or need_gs:
        grad_gc, grad_gs = _ops.gate_apply_backward(grad_out, x, gc, gs, need_gc, need_gs)
    return grad_x, grad_gc if need_gc else None, grad_gs if need_gs else None


def _gate_apply_backward(ctx, grad_out):
    x, gc, gs = ctx.saved_tensors
    return _gated_grads(ctx, dense(grad_out, memory_format_of(x)), x, gc, gs)


torch.library.register_autograd("attnkern::gate_apply", _gate_apply_backward,
                                setup_context=_gate_apply_setup, lib=_lib)


def _relu_grad(grad_out: Tensor, out: Optional[Tensor]) -> Tensor:
    """grad_out where the ReLU's output ``out`` is positive, 0 elsewhere (None: no ReLU)."""
    return grad_out if out is None else torch.ops.aten.threshold_backward(grad_out, out, 0)


def _gate_apply_residual_setup(ctx, inputs, output):
    x, gc, gs, residual, relu = inputs
    ctx.save_for_backward(x, gc, gs, output if relu else None)


def _gate_apply_residual_backward(ctx, grad_out):
    x, gc, gs, out = ctx.saved_tensors
    grad = _relu_grad(dense(grad_out, memory_format_of(x)), out)
    return (*_gated_grads(ctx, grad, x, gc, gs), grad if ctx.needs_input_grad[3] else None, None)


torch.library.register_autograd("attnkern::gate_apply_residual", _gate_apply_residual_backward,
                                setup_context=_gate_apply_residual_setup, lib=_lib)


def _bam_combine_setup(ctx, inputs, output):
    x, mc, ms, product = inputs
    ctx.product = product
    ctx.save_for_backward(x, mc, ms)


def _bam_combine_backward(ctx, grad_out):
    x, mc, ms = ctx.saved_tensors
    grad_out = dense(grad_out, memory_format_of(x))
    grad_x = grad_mc = grad_ms = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.bam_input_grad(x, grad_out, mc, ms, ctx.product, None)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_mc, grad_ms = _ops.bam_combine_backward(grad_out, x, mc, ms, ctx.product)
    return grad_x, grad_mc, grad_ms, None


torch.library.register_autograd("attnkern::bam_combine", _bam_combine_backward,
                                setup_context=_bam_combine_setup, lib=_lib)


# ----------------------------------------------------------------------------------------
# Eager autograd nodes of the fused blocks
# ----------------------------------------------------------------------------------------

class Tape:
    """What the nodes of one block call hand each other during backward."""

    __slots__ = ("prims", "grad_out", "gc", "gs", "smax", "scount", "grad_smean", "grad_smax", "bam")

    def __init__(self, prims: Primitives):
        self.prims = prims
        self.clear()

    def clear(self):
        self.grad_out = self.gc = self.gs = None
        self.smax = self.scount = self.grad_smean = self.grad_smax = None
        self.bam = None  # (mc, ms, product) when the block is BAM


#: BAM's spatial branch at most this wide (its 1x1 projection's output channels R) has the
#: projection's input gradient added in ``bam_input_grad``'s pass; wider ones add it with a
#: matrix product into dx in place. Each element of dx then takes R multiply-adds, and past
#: 16 that pass ran slower than the two transfers it saves (benchmarks/bam_projection_grad_ab.py).
FUSED_PROJECTION_GRAD_MAX_RANK = 16


class ChannelStatsNode(torch.autograd.Function):
    """The channel statistics of x; its backward writes dx.

    With ``branch``, it also returns what a branch of the block computed in PyTorch reads (BAM's
    spatial convolutions): x itself, or with ``proj_weight`` the 1x1 projection of x the branch
    starts with (:func:`pointwise_projection`). The branch's gradient then arrives here and goes
    into dx instead of autograd adding two x-sized gradients into a third, new one: for BAM's
    projection as ``W^T grad`` inside ``bam_input_grad``'s pass (dx written once), otherwise
    added into dx in place."""

    @staticmethod
    def forward(ctx, x: Tensor, tape: Tape, branch: bool = False, proj_weight: Optional[Tensor] = None,
                proj_bias: Optional[Tensor] = None):
        ctx.set_materialize_grads(False)  # an unused statistic costs nothing in the dx pass
        mean, mx, cnt = tape.prims.channel_stats(x)
        token = x.new_zeros((), dtype=acc_dtype(x.dtype))
        branch_in = None
        if branch:
            branch_in = x if proj_weight is None else pointwise_projection(x, proj_weight, proj_bias)
        ctx.tape = tape
        ctx.save_for_backward(x, mx, cnt, proj_weight)
        ctx.mark_non_differentiable(cnt)
        return mean, mx, cnt, token, branch_in

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_max, _grad_count, _grad_token, grad_branch=None):
        x, mx, cnt, proj_weight = ctx.saved_tensors
        t: Tape = ctx.tape
        dx = None
        grad_branch_in_dx = False
        if ctx.needs_input_grad[0]:
            if t.bam is not None:
                mc, ms, product = t.bam
                if grad_branch is not None and proj_weight is not None and \
                        proj_weight.shape[0] <= FUSED_PROJECTION_GRAD_MAX_RANK:
                    # the projection's input gradient W^T grad_branch in the same pass
                    dx = t.prims.bam_input_grad(x, t.grad_out, mc, ms, product, grad_mean, grad_branch, proj_weight)
                    grad_branch_in_dx = True
                else:
                    dx = t.prims.bam_input_grad(x, t.grad_out, mc, ms, product, grad_mean)
            else:
                spatial = t.grad_smean is not None
                dx = t.prims.gating_input_grad(
                    x, t.grad_out, t.gc, t.gs,
                    t.smax if spatial else None, t.scount if spatial else None,
                    t.grad_smean, t.grad_smax,
                    mx if grad_max is not None else None, cnt if grad_max is not None else None,
                    grad_mean, grad_max,
                )
        t.clear()
        grad_w = grad_b = None
        if grad_branch is not None:
            if proj_weight is None:
                dx = dx.add_(grad_branch) if dx is not None else None
            else:
                grad_w, grad_b = pointwise_projection_backward_(None if grad_branch_in_dx else dx, x, proj_weight,
                                                                grad_branch, ctx.needs_input_grad[3],
                                                                ctx.needs_input_grad[4])
        return dx, None, None, grad_w, grad_b


class SpatialStatsNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gc: Tensor, token: Tensor, tape: Tape):
        ctx.set_materialize_grads(False)
        mean, mx, cnt = tape.prims.spatial_stats(x, gc)
        ctx.tape = tape
        ctx.save_for_backward(x, gc, mx, cnt)
        ctx.mark_non_differentiable(cnt)
        return mean, mx, cnt

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_max, _grad_count):
        x, gc, mx, cnt = ctx.saved_tensors
        t: Tape = ctx.tape
        grad_mean = grad_mean if grad_mean is not None else torch.zeros_like(mx)
        grad_max = grad_max if grad_max is not None else torch.zeros_like(mx)
        grad_gc = None
        if ctx.needs_input_grad[1]:
            grad_gc = t.prims.spatial_stats_backward(x, gc, mx, cnt, grad_mean, grad_max)
        if ctx.needs_input_grad[0]:  # dx is written once, by ChannelStatsNode
            t.gc, t.smax, t.scount, t.grad_smean, t.grad_smax = gc, mx, cnt, grad_mean, grad_max
        return None, grad_gc, torch.zeros_like(gc[0, 0]), None


class ApplyNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gc: Tensor, gs: Tensor, token: Tensor, tape: Tape):
        out = tape.prims.gate_apply(x, gc, gs)
        ctx.tape = tape
        ctx.save_for_backward(x, gc, gs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, gc, gs = ctx.saved_tensors
        grad_gc, grad_gs = _apply_node_grads(ctx, dense(grad_out, memory_format_of(x)), x, gc, gs)
        return None, grad_gc, grad_gs, torch.zeros_like(gc[0, 0]), None


def _apply_node_grads(ctx, grad: Tensor, x: Tensor, gc: Tensor, gs: Optional[Tensor]):
    """An apply node's backward for the (dense) gradient of ``x * gc * gs``: the gates' gradients
    (None where not needed), and grad kept on the tape for the dx pass of ChannelStatsNode."""
    t: Tape = ctx.tape
    need_gc, need_gs = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_gc = grad_gs = None
    if need_gc or need_gs:
        grad_gc, grad_gs = t.prims.gate_apply_backward(grad, x, gc, gs, need_gc, need_gs)
        grad_gc, grad_gs = (grad_gc if need_gc else None), (grad_gs if need_gs else None)
    if ctx.needs_input_grad[0]:  # dx is written once, by ChannelStatsNode
        t.grad_out, t.gc, t.gs = grad, gc, gs
    return grad_gc, grad_gs


class ApplyResidualNode(torch.autograd.Function):
    """``relu?(x * gc * gs + residual)`` (a residual block's add and activation in the apply
    pass). Its backward masks grad_out by the ReLU (``out > 0``), which is then the residual's
    gradient, and goes on as :class:`ApplyNode` does with it. Saves the output for the mask, as
    an in-place ``nn.ReLU`` after the add does."""

    @staticmethod
    def forward(ctx, x: Tensor, gc: Tensor, gs: Optional[Tensor], residual: Tensor, token: Tensor, tape: Tape,
                relu: bool):
        out = tape.prims.gate_apply_residual(x, gc, gs, residual, relu)
        ctx.tape = tape
        ctx.save_for_backward(x, gc, gs, out if relu else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, gc, gs, out = ctx.saved_tensors
        grad = _relu_grad(dense(grad_out, memory_format_of(x)), out)
        grad_gc, grad_gs = _apply_node_grads(ctx, grad, x, gc, gs)
        grad_residual = grad if ctx.needs_input_grad[3] else None
        return None, grad_gc, grad_gs, grad_residual, torch.zeros_like(gc[0, 0]), None, None


class BamCombineNode(torch.autograd.Function):
    """BAM's combine; its backward computes the logits' gradients and leaves dx to
    ``ChannelStatsNode``, which writes grad_out * (1 + sigmoid(z)) + grad_mean / HW in one pass."""

    @staticmethod
    def forward(ctx, x: Tensor, mc: Tensor, ms: Tensor, token: Tensor, tape: Tape, product: bool):
        out = tape.prims.bam_combine(x, mc, ms, product)
        ctx.tape, ctx.product = tape, product
        ctx.save_for_backward(x, mc, ms)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, mc, ms = ctx.saved_tensors
        t: Tape = ctx.tape
        grad_mc = grad_ms = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_mc, grad_ms = t.prims.bam_combine_backward(grad_out, x, mc, ms, ctx.product)
        if ctx.needs_input_grad[0]:
            t.grad_out, t.bam = dense(grad_out, memory_format_of(x)), (mc, ms, ctx.product)
        return None, grad_mc, grad_ms, torch.zeros_like(mc[0, 0]), None, None


# Under torch.no_grad the direct calls skip the dispatcher's autograd layer, where the ops'
# registered formulas put a Python wrapper that only redispatches (SE and CBAM at batch 1:
# 1.10-1.27x faster a call, benchmarks/RESULTS.md). torch.inference_mode skips that layer
# itself, so there the guard is not entered. Version counters of in-place ops are kept: that
# key is below autograd's.
_below_autograd = torch._C._AutoDispatchBelowAutograd


class BlockPasses:
    """The passes over x of one fused block, as autograd sees them; the one place that tells
    eager from traced code apart.

    Eager: the autograd nodes above, sharing one :class:`Tape`, so the input gradient is written
    once by ``ChannelStatsNode``. Traced by ``torch.compile`` (dynamo cannot trace a Tape): the
    ``attnkern::`` ops with their registered autograd formulas, each writing its own term of dx,
    which the compiled graph adds. Both formulations call the same backward primitives
    (``gate_apply_backward``, ``spatial_stats_backward``, ``bam_combine_backward``,
    ``gating_input_grad``, ``bam_input_grad``): the math of every gradient is written once, in
    the kernels and in :mod:`attnkern.reference.gating`.

    Without autograd (``torch.no_grad``, ``torch.inference_mode``), eager calls go to the
    primitives directly.

    Call :meth:`channel_stats` first: its node is the one autograd runs last.
    """

    def __init__(self, primitives=None):
        self.traced = torch.compiler.is_compiling()
        # Eager without autograd (torch.no_grad, torch.inference_mode): the primitives are called
        # directly. The nodes would record nothing, and their Python (Function.apply, the token
        # tensor) cost about 20 us a block, most of a batch-1 block's time.
        self.direct = None if self.traced or torch.is_grad_enabled() else as_primitives(primitives)
        self.below_autograd = (_below_autograd if self.direct is not None and not torch.is_inference_mode_enabled()
                               else contextlib.nullcontext)
        self.tape = None if self.traced or self.direct is not None else Tape(as_primitives(primitives))
        self.token: Optional[Tensor] = None

    def channel_stats(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(mean, max) over H, W: [B, C] each, accumulation dtype."""
        if self.direct is not None:
            with self.below_autograd():
                mean, mx, _ = self.direct.channel_stats(x)
        elif self.traced:
            mean, mx, _ = _ops.channel_stats(x)
        else:
            mean, mx, _, self.token, _ = ChannelStatsNode.apply(x, self.tape)
        return mean, mx

    def channel_stats_and_branch_input(
        self, x: Tensor, projection: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`channel_stats`, and what a PyTorch branch on x reads: x, or with ``projection``
        (weight [R, C, 1, 1] and bias [R] or None, x's dtype) the branch's first layer, that 1x1
        convolution of x, [B, R, H, W]. In eager autograd both come from ``ChannelStatsNode``,
        so that the branch's gradient of x is added into the block's dx in place (one x-sized
        gradient fewer)."""
        if self.direct is not None or self.traced:
            mean, mx = self.channel_stats(x)
            if projection is None:
                return mean, mx, x
            if self.traced:
                return mean, mx, torch.nn.functional.conv2d(x, *projection)
            with self.below_autograd():
                return mean, mx, pointwise_projection(x, *projection)
        mean, mx, _, self.token, branch_in = ChannelStatsNode.apply(
            x, self.tape, True, *(projection if projection is not None else (None, None)))
        return mean, mx, branch_in

    def spatial_stats(self, x: Tensor, gc: Tensor) -> Tuple[Tensor, Tensor]:
        """(mean, max) over C of x * gc: [B, H*W] each."""
        if self.direct is not None:
            with self.below_autograd():
                mean, mx, _ = self.direct.spatial_stats(x, gc)
        elif self.traced:
            mean, mx, _ = _ops.spatial_stats(x, gc)
        else:
            mean, mx, _ = SpatialStatsNode.apply(x, gc, self.token, self.tape)
        return mean, mx

    def gate_apply(self, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor]) -> Tensor:
        """x * gc[:, :, None, None] * gs (either gate may be None), in x's dtype and layout."""
        if self.direct is not None:
            with self.below_autograd():
                return self.direct.gate_apply(x, gc, gs)
        if self.traced:
            return _ops.gate_apply(x, gc, gs)
        return ApplyNode.apply(x, gc, gs, self.token, self.tape)

    def gate_apply_residual(self, x: Tensor, gc: Tensor, gs: Optional[Tensor], residual: Tensor,
                            relu: bool, in_place: bool = False) -> Tensor:
        """relu?(x * gc[:, :, None, None] * gs + residual) (gs may be None), a new tensor in x's
        dtype and layout: :meth:`gate_apply` with a residual block's add and activation.
        ``in_place`` (without autograd only; x dense): written into x instead, which is returned."""
        if self.direct is not None:
            with self.below_autograd():
                if in_place:
                    return self.direct.gate_apply_residual_(x, gc, gs, residual, relu)
                return self.direct.gate_apply_residual(x, gc, gs, residual, relu)
        if in_place:
            raise RuntimeError("attnkern: the residual apply writes into x only without autograd")
        if self.traced:
            return _ops.gate_apply_residual(x, gc, gs, residual, relu)
        return ApplyResidualNode.apply(x, gc, gs, residual, self.token, self.tape, relu)

    def bam_combine(self, x: Tensor, mc: Tensor, ms: Tensor, product: bool) -> Tensor:
        """x * (1 + sigmoid(mc + ms)) (``product``: mc * ms inside the sigmoid)."""
        if self.direct is not None:
            with self.below_autograd():
                return self.direct.bam_combine(x, mc, ms, product)
        if self.traced:
            return _ops.bam_combine(x, mc, ms, product)
        return BamCombineNode.apply(x, mc, ms, self.token, self.tape, product)
