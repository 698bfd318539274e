"""Scaled dot-product attention: the Triton flash-attention kernels as a ``torch.library`` op
with its autograd formula, the argument checks (:func:`resolve`: torch's rules and exception
types, any rank, grouped-query attention, ``CausalBias``), and the choice between the three
backends.

- ``triton`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``): ``attnkern::flash_attention``
  runs :func:`attnkern.triton.attention.attention_fwd` (O and the softmax statistics) and its backward
  ``attnkern::flash_attention_backward`` runs :func:`attention_bwd` (delta pre-pass, dK/dV per
  key block, dQ per query block: no atomics, so gradients are bitwise reproducible). q, k and v
  are taken with their strides (views of a packed qkv projection are not copied). A boolean
  mask becomes an additive float32 mask of its own (broadcastable) shape; the kernels read it
  through stride-0 broadcast views, so a key-padding mask [B, 1, 1, N_k] is never expanded to
  N_q x N_k. A float mask that requires grad gets its gradient (summed down to its shape).
  Grouped-query attention reaches the kernels with k and v's own head count (nothing
  repeated); both causal variants are kernel flags (no mask tensor).
- ``cpu``: ATen's own fused SDPA (``torch.nn.functional.scaled_dot_product_attention``), a
  well-kept kernel with its own autograd: attnkern does not rewrite it.
- ``reference``: :mod:`attnkern.reference.attention` (materialises the scores).

While a model is exported (``torch.export``, ONNX) the op is ATen's SDPA on every device
unless a backend is forced: one standard node, no custom op and no N x N matrix in the graph.

Backend choice goes through :func:`attnkern._backend.pick`: inputs the Triton kernels do not
take (float64, head dims above 256) run the reference there, with a one-time warning.
``dropout_p > 0`` is handed to ATen's SDPA on every backend (the flash kernels have no dropout).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..reference import attention as _ref

__all__ = ["pick_backend", "resolve", "Inputs", "scaled_dot_product_attention", "flash_attention", "ATTENTION_DTYPES"]

def _ta():
    from ..triton import attention as ta

    return ta


def pick_backend(q: Tensor, v: Tensor) -> str:
    """The backend that runs attention on q [B, H, N_q, D] and v [B, H, N_k, D_v]."""

    def supports(backend: str) -> Optional[str]:
        if backend == "triton":
            ta = _ta()
            if q.dtype not in ta.SUPPORTED_DTYPES:
                return f"the triton attention kernels do not take {q.dtype}"
            d = max(q.shape[-1], v.shape[-1])
            if d > ta.MAX_HEAD_DIM:
                return f"the triton attention kernels take head dims up to {ta.MAX_HEAD_DIM}, got {d}"
        return None

    if _backend.forced() is None and _backend.exporting():
        return "aten"  # ATen's SDPA exports as one node on every device (no N x N reference)
    return _backend.pick("scaled_dot_product_attention", q.device, supports, extension=False)


def _sum_to(g: Tensor, shape) -> Tensor:
    """Sum a [B, H, N_q, N_k] gradient down to a mask's broadcastable ``shape``."""
    lead = g.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1]
    return g.sum(dim=dims, keepdim=True).reshape(shape) if dims else g.reshape(shape)


# ----------------------------------------------------------------------------------------
# Arguments: torch's rules, torch's exception types
# ----------------------------------------------------------------------------------------

ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Inputs(NamedTuple):
    """Validated attention inputs as 4-D [B, H, N, D] views (``v`` None for the maps).

    ``batch``: the leading dimensions of the result (all but the last two of the broadcast
    inputs); the result of a 4-D computation is reshaped to ``batch + (N_q, D_v)``.
    ``mask``: None, or a boolean / additive float mask that broadcasts to [B, H, N_q, N_k].
    ``causal``: None, ``"upper_left"`` (``is_causal``, key j kept for query i iff j <= i) or
    ``"lower_right"`` (the diagonal aligned to the last key: j <= i + N_k - N_q).
    ``kv_group``: query heads per kv head (grouped-query attention; 1 otherwise)."""
    q: Tensor
    k: Tensor
    v: Optional[Tensor]
    mask: Optional[Tensor]
    causal: Optional[str]
    batch: Tuple[int, ...]
    kv_group: int


_KNOWN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _check_tensor_type(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"attnkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    cls = type(t)
    if cls in _KNOWN_TENSOR_TYPES:
        return
    # Subclasses that resolve their meaning in Python (__torch_function__) may be placeholders
    # whose storage holds nothing (torch.nn.attention.bias.CausalBias is one): never read them.
    # Subclasses that only hook the dispatcher (FakeTensor, FunctionalTensor: tracing) are fine.
    if cls.__torch_function__ is not torch._C._disabled_torch_function_impl:
        raise TypeError(f"attnkern.{op}: {name} is a {cls.__module__}.{cls.__qualname__}, a tensor "
                        f"subclass attnkern does not know; pass a plain torch.Tensor")


def _broadcast(op: str, shapes, what: str) -> Tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise RuntimeError(f"attnkern.{op}: the batch dimensions of {what} do not broadcast: "
                           + ", ".join(str(tuple(s)) for s in shapes)) from None


def _to4(t: Tensor, lead: Tuple[int, ...]) -> Tensor:
    """``t`` expanded to ``lead + t.shape[-2:]`` (broadcast dims: stride 0), as a 4-D
    [B, H, N, D] tensor (a view unless merging expanded batch dims needs a copy)."""
    t = t.expand(*lead, *t.shape[-2:])
    if len(lead) == 2:
        return t
    if len(lead) < 2:
        return t.reshape((1,) * (2 - len(lead)) + tuple(t.shape))
    return t.reshape(-1, *t.shape[-3:])


def _mask_to4(m: Tensor, full: Tuple[int, ...]) -> Tensor:
    """A mask broadcastable to ``full`` (rank R >= 2), as one broadcastable to the 4-D view
    (a 1-D key mask [S] as [1, S]: ATen's kernels take masks of rank >= 2)."""
    if m.dim() < 2:
        m = m.reshape(1, -1)
    if m.dim() <= 3 or len(full) <= 4:
        return m
    m = m.reshape((1,) * (len(full) - m.dim()) + tuple(m.shape))
    if all(s == 1 for s in m.shape[:-3]):
        return m.reshape(1, *m.shape[-3:])
    return m.expand(*full[:-3], *m.shape[-3:]).reshape(-1, *m.shape[-3:])


def resolve(op: str, q, k, v=None, attn_mask=None, *, dropout_p: float = 0.0, is_causal: bool = False,
            scale=None, enable_gqa: bool = False) -> Inputs:
    """Check attention arguments as ``torch.nn.functional.scaled_dot_product_attention`` does,
    raising the exception types torch raises (``RuntimeError`` for shapes, dtypes, devices,
    a mask with ``is_causal``; ``TypeError`` for arguments of the wrong type; ``ValueError``
    for a ``CausalBias`` with ``is_causal``), and return them as :class:`Inputs`.

    q (N, ..., H_q, L, E), k (N, ..., H_k, S, E), v (N, ..., H_v, S, E_v): rank >= 2, the
    leading dimensions broadcast as torch broadcasts them; with ``enable_gqa`` H_k and H_v
    divide H_q (grouped-query attention) and the dimensions before the heads broadcast.
    ``attn_mask``: None, a bool mask (True = attend), an additive float mask (float32 or q's
    dtype) broadcastable to (N, ..., H_q, L, S), or a ``torch.nn.attention.bias.CausalBias``.
    """
    named = [("query", q), ("key", k)] + ([("value", v)] if v is not None else [])
    for name, t in named:
        _check_tensor_type(op, name, t)
    for name, t in named:
        if t.dim() < 2:
            raise RuntimeError(f"attnkern.{op}: {name} must have at least 2 dimensions (..., L, E), "
                               f"got {t.dim()}-D shape {tuple(t.shape)}")
        if t.dtype not in ATTENTION_DTYPES:
            raise RuntimeError(f"attnkern.{op}: {name} must be float32, bfloat16, float16 or float64, "
                               f"got {t.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise RuntimeError(f"attnkern.{op}: query, key and value must have one dtype, got query "
                               f"{q.dtype} and {name} {t.dtype}")
        if t.device != q.device:
            raise RuntimeError(f"attnkern.{op}: query, key and value must be on one device, got query "
                               f"on {q.device} and {name} on {t.device}")
    if k.shape[-1] != q.shape[-1]:
        raise RuntimeError(f"attnkern.{op}: query and key must have the same head dim E, got query "
                           f"{tuple(q.shape)} and key {tuple(k.shape)}")
    if v is not None and v.shape[-2] != k.shape[-2]:
        raise RuntimeError(f"attnkern.{op}: key and value must hold the same number of tokens S, got "
                           f"key {tuple(k.shape)} and value {tuple(v.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"attnkern.{op}: the head dim must be positive, got query {tuple(q.shape)}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"attnkern.{op}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise RuntimeError(f"attnkern.{op}: dropout_p must be in [0, 1], got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"attnkern.{op}: scale must be a float or None, got {type(scale).__name__}")
    if not isinstance(is_causal, (bool, int)):
        raise TypeError(f"attnkern.{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, (bool, int)):
        raise TypeError(f"attnkern.{op}: enable_gqa must be a bool, got {type(enable_gqa).__name__}")

    # batch dimensions and heads
    L, S = q.shape[-2], k.shape[-2]
    others = [t for t in (k, v) if t is not None]
    group = 1
    if enable_gqa and q.dim() >= 3 and any(t.dim() >= 3 and t.shape[-3] != q.shape[-3] for t in others):
        if any(t.dim() < 3 for t in others):
            raise RuntimeError(f"attnkern.{op}: enable_gqa needs a head dimension (-3) in query, key "
                               f"and value, got key {tuple(k.shape)}")
        hq = q.shape[-3]
        for name, t in named[1:]:
            if t.shape[-3] == 0 or hq % t.shape[-3] != 0:
                raise RuntimeError(f"attnkern.{op}: the number of heads of key and value must divide "
                                   f"the number of heads of query, got query {tuple(q.shape)} and "
                                   f"{name} {tuple(t.shape)}")
        lead = _broadcast(op, [t.shape[:-3] for _, t in named], "query, key and value")
        hk = k.shape[-3] if v is None else math.lcm(k.shape[-3], v.shape[-3])
        group = hq // hk

        def kv(t: Tensor) -> Tensor:  # k and v with different head counts: repeat the smaller
            r = hk // t.shape[-3]
            return t if r == 1 else t.repeat_interleave(r, dim=-3)

        q4 = _to4(q, lead + (hq,))
        k4 = _to4(kv(k), lead + (hk,))
        v4 = _to4(kv(v), lead + (hk,)) if v is not None else None
        batch = lead + (hq,)
    else:
        batch = _broadcast(op, [t.shape[:-2] for _, t in named], "query, key and value")
        q4, k4 = _to4(q, batch), _to4(k, batch)
        v4 = _to4(v, batch) if v is not None else None
    full = batch + (L, S)

    # the mask
    mask, causal = None, ("upper_left" if is_causal else None)
    if attn_mask is not None:
        variant = _ref.causal_bias_variant(attn_mask)
        if variant is not None:
            if is_causal:
                raise ValueError(f"attnkern.{op}: a CausalBias attn_mask must not be used with is_causal=True")
            if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
                raise RuntimeError(f"attnkern.{op}: the CausalBias is for {attn_mask.seq_len_q} queries and "
                                   f"{attn_mask.seq_len_kv} keys, got L={L} and S={S}")
            causal = variant
        else:
            _check_tensor_type(op, "attn_mask", attn_mask)
            if is_causal:
                raise RuntimeError(f"attnkern.{op}: give attn_mask or is_causal=True, not both")
            if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
                raise RuntimeError(f"attnkern.{op}: attn_mask must be bool, float32 or query's dtype "
                                   f"{q.dtype}, got {attn_mask.dtype}")
            if attn_mask.device != q.device:
                raise RuntimeError(f"attnkern.{op}: attn_mask must be on query's device {q.device}, got "
                                   f"{attn_mask.device}")
            ok = attn_mask.dim() <= len(full) and all(
                m in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full)))
            if not ok:
                raise RuntimeError(f"attnkern.{op}: attn_mask of shape {tuple(attn_mask.shape)} does not "
                                   f"broadcast to {list(full)} (..., L, S)")
            mask = _mask_to4(attn_mask, full)
    return Inputs(q4, k4, v4, mask, causal, batch, group)


# ----------------------------------------------------------------------------------------
# torch.library ops of the Triton kernels
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("attnkern::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                    scale: float, causal_lower_right: bool = False) -> Tuple[Tensor, Tensor]:
    """``(out, stats)`` of flash attention (stats: [B, H, N_q, 2] row max and log-sum, see
    :func:`attnkern.triton.attention.attention_fwd`); k and v may have fewer heads than q
    (grouped-query attention); ``mask`` additive (float32 or q's dtype) in its own
    broadcastable shape, or None."""
    m4 = None if mask is None else _ref.broadcast_mask(mask, q, k)
    return _ta().attention_fwd(q, k, v, m4, is_causal, scale, causal_lower_right=causal_lower_right)


@flash_attention.register_fake
def _(q, k, v, mask, is_causal, scale, causal_lower_right=False):
    B, H, Nq, _ = q.shape
    out = q.new_empty((B, H, Nq, v.shape[-1]))
    stats = q.new_empty((B, H, Nq, 2), dtype=torch.float32)
    return out, stats


@torch.library.custom_op("attnkern::flash_attention_backward", mutates_args=())
def flash_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor,
                             mask: Optional[Tensor], is_causal: bool, scale: float,
                             need_dmask: bool, causal_lower_right: bool = False
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dmask)``; dmask is summed to ``mask``'s shape (empty unless ``need_dmask``)."""
    m4 = None if mask is None else _ref.broadcast_mask(mask, q, k)
    dq, dk, dv, dm = _ta().attention_bwd(dout, q, k, v, out, stats, m4, is_causal, scale, need_dmask,
                                         causal_lower_right=causal_lower_right)
    if need_dmask and mask is not None:
        dm = _sum_to(dm, mask.shape).to(mask.dtype)
    else:
        dm = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dm


@flash_attention_backward.register_fake
def _(dout, q, k, v, out, stats, mask, is_causal, scale, need_dmask, causal_lower_right=False):
    dm = mask.new_empty(mask.shape) if (need_dmask and mask is not None) else q.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dm


def _setup(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, lower_right = inputs
    out, stats = output
    ctx.is_causal, ctx.scale, ctx.lower_right = is_causal, scale, lower_right
    ctx.has_mask = mask is not None
    ctx.save_for_backward(q, k, v, out, stats, mask)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dout, _dstats):
    q, k, v, out, stats, mask = ctx.saved_tensors
    need_dmask = ctx.has_mask and ctx.needs_input_grad[3]
    dq, dk, dv, dm = torch.ops.attnkern.flash_attention_backward(
        dout, q, k, v, out, stats, mask, ctx.is_causal, ctx.scale, need_dmask, ctx.lower_right)
    return dq, dk, dv, (dm if need_dmask else None), None, None, None


flash_attention.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------
# The op, on a chosen backend
# ----------------------------------------------------------------------------------------

def _nan_rows_of_q(q: Tensor, out: Tensor) -> Tensor:
    """ATen's CPU flash kernel returns a finite row for a query holding NaN (its running max
    skips NaN scores); the math, the reference and our kernels give NaN there."""
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = torch.isnan(q).any(dim=-1, keepdim=True)
        if bool(bad.any()):
            out = torch.where(bad, torch.full_like(out, float("nan")), out)
    return out


#: Rows whose every key carries an additive mask below this are "filled" rows (finfo.min,
#: -1e9 padding); their log-sum-exp rounds to the fill in float32 (at 2**10 its ulp is 1.2e-4).
FILLED_ROW = -2.0 ** 10


def _filled_rows_need_math(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> bool:
    """Whether ATen's CPU flash kernel must not take this call: its backward recomputes P from
    a float32 log-sum-exp, which a huge finite fill absorbs when every key of a row carries
    it (gradients off by whole units for a finfo.min row); its math kernel is exact there.
    Only when gradients are recorded (the forward is right) and outside compiled code."""
    if (mask is None or mask.dtype == torch.bool or not torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or not any(t.requires_grad for t in (q, k, v, mask))):
        return False
    return bool((mask.detach().amax(dim=-1) < FILLED_ROW).any())


def scaled_dot_product_attention(inp: Inputs, dropout_p: float, scale: float, *, backend: str) -> Tensor:
    """Attention on :func:`resolve`'d inputs with ``scale`` resolved, on ``backend``; the
    result has the shape ``inp.batch + (N_q, D_v)``."""
    q, k, v, mask, causal = inp.q, inp.k, inp.v, inp.mask, inp.causal
    lower_right = causal == "lower_right"
    if backend == "reference":
        out = _ref.scaled_dot_product_attention(
            q, _ref.repeat_kv(q, k), _ref.repeat_kv(q, v),
            _ref.causal_mask(q.shape[-2], k.shape[-2], q.device, True) if lower_right else mask,
            dropout_p, causal == "upper_left", scale)
    elif backend in ("cpu", "aten") or dropout_p > 0.0:
        if lower_right:  # as a bool mask: rows with no key give 0, as every other path
            mask = _ref.causal_mask(q.shape[-2], k.shape[-2], q.device, True)
        args = dict(attn_mask=mask, dropout_p=dropout_p, is_causal=causal == "upper_left", scale=scale,
                    enable_gqa=inp.kv_group > 1)
        if _filled_rows_need_math(q, k, v, mask):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v, **args)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **args)
        out = _nan_rows_of_q(q, out)
    elif backend == "triton":
        if mask is not None and mask.dtype == torch.bool:
            mask = _ref.additive_mask(mask, False, q.shape[-2], k.shape[-2], torch.float32)
        out, _ = torch.ops.attnkern.flash_attention(q, k, v, mask, causal is not None, float(scale), lower_right)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return out.reshape(*inp.batch, q.shape[-2], v.shape[-1])
