"""attnkern's validated functional API: checks its arguments, picks a backend, calls the ops.

Backends (see :mod:`attnkern._backend`): CUDA tensors run the Triton kernels, CPU tensors the
C++ extension, anything else the pure-PyTorch reference; ``ATTNKERN_BACKEND`` forces one.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

import math

from .ops import attention as _attention_op
from .ops import bam as _bam_op
from .ops import cbam as _cbam_op
from .ops import se as _se_op
from .ops.gating import FLOAT_DTYPES, acc_dtype, dense, pick_backend, primitives_for
from .reference import bam as _bam_ref
from .reference.attention import broadcast_mask
from .reference import cbam as _cbam_ref
from .reference import se as _se_ref

__all__ = ["cbam", "squeeze_excite", "bam", "scaled_dot_product_attention", "check_feature_map", "check_attention",
           "broadcast_mask"]


def check_feature_map(op: str, x, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a non-empty floating [B, C, H, W] tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"attnkern.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"attnkern.{op}: {name} must be a 4-D tensor [B, C, H, W], got {x.dim()}-D shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"attnkern.{op}: {name} must be float32, bfloat16, float16 or float64, got {x.dtype}"
        )
    if x.numel() == 0:
        raise ValueError(f"attnkern.{op}: {name} must not be empty, got shape {tuple(x.shape)}")


def cbam(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    *,
    pool_order: str = "mean_max",
    gate: Callable[[Tensor], Tensor] = torch.sigmoid,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The CBAM block (channel gate, then spatial gate), fused.

    Args:
        x: feature map [B, C, H, W], NCHW or channels_last (taken without a copy; other strides
            are made dense once), float32 / bfloat16 / float16 / float64.
        mlp: the shared channel MLP, [N, C] -> [N, C]; called once on the stacked mean- and
            max-pooled vectors [2B, C], given in float32 (cast them to the MLP's dtype inside
            ``mlp`` if it differs).
        spatial: the spatial branch, [B, 2, H, W] -> [B, 1, H, W] (kxk conv, BatchNorm...),
            given float32 maps likewise.
        pool_order: ``'mean_max'`` (timm) or ``'max_mean'`` (the CBAM authors' code): the order
            of the two channel-pooled maps fed to ``spatial``.
        gate: the gate non-linearity, applied in float32 (default sigmoid).

    Returns:
        ``(out, gc, gs)``: the output (x's dtype and memory format), the channel gate [B, C] and
        the spatial gate [B, 1, H, W], both float32 (float64 for float64 x), for visualisation.
    """
    check_feature_map("cbam", x)
    if pool_order not in _cbam_ref.POOL_ORDERS:
        raise ValueError(f"attnkern.cbam: pool_order must be one of {_cbam_ref.POOL_ORDERS}, got {pool_order!r}")
    backend = pick_backend("cbam", x)
    if backend == "reference":
        out, gc, gs = _cbam_ref.cbam(x, mlp, spatial, pool_order=pool_order, gate=gate)
        acc = acc_dtype(x.dtype)
        return out, gc.to(acc), gs.to(acc)
    return _cbam_op.cbam(dense(x), mlp, spatial, primitives=primitives_for(backend, x), pool_order=pool_order,
                         gate=gate)


def squeeze_excite(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    *,
    gate: Callable[[Tensor], Tensor] = torch.sigmoid,
    add_maxpool: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Squeeze-and-excitation, fused: ``out = x * gate(mlp(mean_hw(x)))``.

    Args:
        x: feature map [B, C, H, W] (as for :func:`cbam`).
        mlp: [B, C] -> [B, C], given the pooled vector in float32 (float64 for float64 x).
        gate: applied in float32 (sigmoid by default; hard-sigmoid and any other function work
            the same way, since the gate runs on the tiny [B, C] tensor).
        add_maxpool: pool with ``0.5 * mean + 0.5 * max`` (timm's option).

    Returns:
        ``(out, gc)``: the output (x's dtype and memory format) and the channel gate [B, C].
    """
    check_feature_map("squeeze_excite", x)
    backend = pick_backend("squeeze_excite", x)
    if backend == "reference":
        out, gc = _se_ref.squeeze_excite(x, mlp, gate=gate, add_maxpool=add_maxpool)
        return out, gc.to(acc_dtype(x.dtype))
    return _se_op.squeeze_excite(dense(x), mlp, primitives=primitives_for(backend, x), gate=gate,
                                 add_maxpool=add_maxpool)


def bam(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    spatial: Callable[[Tensor], Tensor],
    *,
    combine: str = "sum",
) -> Tuple[Tensor, Tensor, Tensor]:
    """The Bottleneck Attention Module's combine, fused: ``x * (1 + sigmoid(mc + ms))``.

    Args:
        x: feature map [B, C, H, W] (as for :func:`cbam`).
        mlp: the channel branch on the mean-pooled vector, [B, C] -> [B, C], given float32.
        spatial: the spatial branch on x itself, [B, C, H, W] -> [B, 1, H, W].
        combine: ``'sum'`` (the paper) or ``'product'`` (``mc * ms``, the authors' released
            code, which their weights need).

    Returns:
        ``(out, mc, ms)``: the output (x's dtype and memory format), the channel logits [B, C]
        and the spatial logits [B, 1, H, W] (float32).
    """
    check_feature_map("bam", x)
    if combine not in _bam_ref.COMBINES:
        raise ValueError(f"attnkern.bam: combine must be one of {_bam_ref.COMBINES}, got {combine!r}")
    backend = pick_backend("bam", x)
    if backend == "reference":
        out, mc, ms = _bam_ref.bam(x, mlp, spatial, combine=combine)
        acc = acc_dtype(x.dtype)
        return out, mc.to(acc), ms.to(acc)
    return _bam_op.bam(dense(x), mlp, spatial, primitives=primitives_for(backend, x), combine=combine)


ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_attention(op: str, q, k, v=None, attn_mask=None, *, dropout_p: float = 0.0,
                    is_causal: bool = False, scale=None) -> None:
    """Raise a clear error unless q [B, H, N_q, D], k [B, H, N_k, D] (and v [B, H, N_k, D_v])
    and the mask are what ``torch.nn.functional.scaled_dot_product_attention`` takes: the same
    floating dtype and device, equal leading dimensions, a boolean, float32 or q-dtype mask that
    broadcasts to [B, H, N_q, N_k], and not both a mask and ``is_causal``."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"attnkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attnkern.{op}: {name} must be a 4-D tensor [B, H, N, D], got "
                             f"{t.dim()}-D shape {tuple(t.shape)}")
        if t.dtype not in ATTENTION_DTYPES:
            raise TypeError(f"attnkern.{op}: {name} must be float32, bfloat16, float16 or float64, "
                            f"got {t.dtype}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"attnkern.{op}: q, k and v must have one dtype, got q {q.dtype} and "
                            f"{name} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attnkern.{op}: q, k and v must be on one device, got q on {q.device} "
                             f"and {name} on {t.device}")
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(f"attnkern.{op}: k's batch and heads {tuple(k.shape[:2])} must equal q's "
                         f"{tuple(q.shape[:2])} (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"attnkern.{op}: q and k must have the same head dim, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    if v is not None and (v.shape[:2] != k.shape[:2] or v.shape[2] != k.shape[2]):
        raise ValueError(f"attnkern.{op}: v must be [B, H, N_k, D_v] with k's B, H and N_k, got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"attnkern.{op}: the head dim must be positive, got q {tuple(q.shape)}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"attnkern.{op}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attnkern.{op}: scale must be a float or None, got {type(scale).__name__}")
    if attn_mask is not None:
        if is_causal:
            raise ValueError(f"attnkern.{op}: give attn_mask or is_causal=True, not both")
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attnkern.{op}: attn_mask must be a torch.Tensor or None, got "
                            f"{type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):
            raise TypeError(f"attnkern.{op}: attn_mask must be bool, float32 or q's dtype {q.dtype}, "
                            f"got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attnkern.{op}: attn_mask must be on q's device {q.device}, got "
                             f"{attn_mask.device}")
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        ok = 2 <= attn_mask.dim() <= 4 and all(
            m in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full)))
        if not ok:
            raise ValueError(f"attnkern.{op}: attn_mask of shape {tuple(attn_mask.shape)} does not "
                             f"broadcast to [B, H, N_q, N_k] = {list(full)}")


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
) -> Tensor:
    """Scaled dot-product attention with ``torch.nn.functional.scaled_dot_product_attention``'s
    signature and semantics: ``softmax(q @ k^T * scale + mask) @ v``.

    Args:
        q: queries [B, H, N_q, D]; k: keys [B, H, N_k, D]; v: values [B, H, N_k, D_v]. One
            floating dtype and device; any strides (views cut from a packed qkv projection are
            read in place on the GPU).
        attn_mask: None, a boolean mask (True = attend) or an additive float mask (float32 or
            q's dtype, may require grad), broadcastable to [B, H, N_q, N_k]: e.g. a key-padding
            mask [B, 1, 1, N_k] for bags of tiles of different sizes. Query rows with no key
            left give zeros (as ATen).
        dropout_p: dropout on the attention probabilities. The flash kernels have none: with
            ``dropout_p > 0`` the call is handed to ATen's SDPA.
        is_causal: key j is attended by query i only if j <= i (top-left aligned). Not with a mask.
        scale: defaults to 1 / sqrt(D).

    Returns:
        [B, H, N_q, D_v] in q's dtype. CUDA tensors run the Triton flash-attention kernels
        (float16, bfloat16, float32; head dims up to 256; deterministic backward, no atomics);
        CPU tensors run ATen's fused SDPA; float64 on the GPU and larger head dims run the
        reference.
    """
    check_attention("scaled_dot_product_attention", q, k, v, attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = _attention_op.pick_backend(q, v)
    return _attention_op.scaled_dot_product_attention(q, k, v, attn_mask, float(dropout_p), bool(is_causal),
                                                      scale, backend=backend)
