"""Scaled dot-product attention: the Triton flash-attention kernels as a ``torch.library`` op
with its autograd formula, and the choice between the three backends.

- ``triton`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``): ``attnkern::flash_attention``
  runs :func:`attnkern.triton.attention.attention_fwd` (O and the log-sum-exp) and its backward
  ``attnkern::flash_attention_backward`` runs :func:`attention_bwd` (delta pre-pass, dK/dV per
  key block, dQ per query block: no atomics, so gradients are bitwise reproducible). q, k and v
  are taken with their strides (views of a packed qkv projection are not copied). A boolean
  mask becomes an additive float32 mask of its own (broadcastable) shape; the kernels read it
  through stride-0 broadcast views, so a key-padding mask [B, 1, 1, N_k] is never expanded to
  N_q x N_k. A float mask that requires grad gets its gradient (summed down to its shape).
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

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..reference import attention as _ref

__all__ = ["pick_backend", "scaled_dot_product_attention", "flash_attention"]

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
# torch.library ops of the Triton kernels
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("attnkern::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                    scale: float) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of flash attention; ``mask`` additive (float32 or q's dtype) in its own
    broadcastable shape, or None."""
    m4 = None if mask is None else _ref.broadcast_mask(mask, q, k)
    return _ta().attention_fwd(q, k, v, m4, is_causal, scale)


@flash_attention.register_fake
def _(q, k, v, mask, is_causal, scale):
    B, H, Nq, _ = q.shape
    out = q.new_empty((B, H, Nq, v.shape[-1]))
    lse = q.new_empty((B, H, Nq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnkern::flash_attention_backward", mutates_args=())
def flash_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             mask: Optional[Tensor], is_causal: bool, scale: float,
                             need_dmask: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dmask)``; dmask is summed to ``mask``'s shape (empty unless ``need_dmask``)."""
    m4 = None if mask is None else _ref.broadcast_mask(mask, q, k)
    dq, dk, dv, dm = _ta().attention_bwd(dout, q, k, v, out, lse, m4, is_causal, scale, need_dmask)
    if need_dmask and mask is not None:
        dm = _sum_to(dm, mask.shape).to(mask.dtype)
    else:
        dm = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dm


@flash_attention_backward.register_fake
def _(dout, q, k, v, out, lse, mask, is_causal, scale, need_dmask):
    dm = mask.new_empty(mask.shape) if (need_dmask and mask is not None) else q.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dm


def _setup(ctx, inputs, output):
    q, k, v, mask, is_causal, scale = inputs
    out, lse = output
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.has_mask = mask is not None
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    need_dmask = ctx.has_mask and ctx.needs_input_grad[3]
    dq, dk, dv, dm = torch.ops.attnkern.flash_attention_backward(
        dout, q, k, v, out, lse, mask, ctx.is_causal, ctx.scale, need_dmask)
    return dq, dk, dv, (dm if need_dmask else None), None, None


flash_attention.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------
# The op, on a chosen backend
# ----------------------------------------------------------------------------------------

def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                                 is_causal: bool, scale: float, *, backend: str) -> Tensor:
    """Attention on validated inputs with ``scale`` resolved, on ``backend``."""
    if backend == "reference":
        return _ref.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)
    if backend in ("cpu", "aten") or dropout_p > 0.0:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale)
        if q.device.type == "cpu" and not torch.compiler.is_compiling():
            # ATen's CPU flash kernel returns a finite row for a query holding NaN (its running
            # max skips NaN scores); the math, the reference and our kernels give NaN there.
            bad = torch.isnan(q).any(dim=-1, keepdim=True)
            if bool(bad.any()):
                out = torch.where(bad, torch.full_like(out, float("nan")), out)
        return out
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}")
    mask = attn_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = _ref.additive_mask(mask, False, q.shape[-2], k.shape[-2], torch.float32)
    out, _ = torch.ops.attnkern.flash_attention(q, k, v, mask, bool(is_causal), float(scale))
    return out
