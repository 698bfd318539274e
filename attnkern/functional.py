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
    spatial_gate: Optional[Callable[[Tensor], Tensor]] = None,
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
        spatial_gate: the spatial branch's gate, if it differs from ``gate`` (default: ``gate``).

    Returns:
        ``(out, gc, gs)``: the output (x's dtype and memory format), the channel gate [B, C] and
        the spatial gate [B, 1, H, W], both float32 (float64 for float64 x), for visualisation.
    """
    check_feature_map("cbam", x)
    if pool_order not in _cbam_ref.POOL_ORDERS:
        raise ValueError(f"attnkern.cbam: pool_order must be one of {_cbam_ref.POOL_ORDERS}, got {pool_order!r}")
    backend = pick_backend("cbam", x)
    if backend == "reference":
        out, gc, gs = _cbam_ref.cbam(x, mlp, spatial, pool_order=pool_order, gate=gate, spatial_gate=spatial_gate)
        acc = acc_dtype(x.dtype)
        return out, gc.to(acc), gs.to(acc)
    return _cbam_op.cbam(dense(x), mlp, spatial, primitives=primitives_for(backend, x), pool_order=pool_order,
                         gate=gate, spatial_gate=spatial_gate)


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
    spatial_projection: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The Bottleneck Attention Module's combine, fused: ``x * (1 + sigmoid(mc + ms))``.

    Args:
        x: feature map [B, C, H, W] (as for :func:`cbam`).
        mlp: the channel branch on the mean-pooled vector, [B, C] -> [B, C], given float32.
        spatial: the spatial branch on x itself, [B, C, H, W] -> [B, 1, H, W].
        combine: ``'sum'`` (the paper) or ``'product'`` (``mc * ms``, the authors' released
            code, which their weights need).
        spatial_projection: optional ``(weight, bias)`` of a 1x1 convolution that the spatial
            branch starts with (weight [R, C, 1, 1], bias [R] or None, x's dtype and device).
            Given, ``spatial`` receives that convolution of x, [B, R, H, W], instead of x: the
            block computes it as a matrix product over x's memory and in the backward pass adds
            its input gradient into dx: inside the pass that writes dx for R <= 16, in place
            after it otherwise (BAM's ``conv_reduce``).

    Returns:
        ``(out, mc, ms)``: the output (x's dtype and memory format), the channel logits [B, C]
        and the spatial logits [B, 1, H, W] (float32).
    """
    check_feature_map("bam", x)
    if combine not in _bam_ref.COMBINES:
        raise ValueError(f"attnkern.bam: combine must be one of {_bam_ref.COMBINES}, got {combine!r}")
    if spatial_projection is not None:
        _check_projection(x, spatial_projection)
    backend = pick_backend("bam", x)
    if backend == "reference":
        if spatial_projection is not None:
            branch = spatial
            spatial = lambda t: branch(torch.nn.functional.conv2d(t, *spatial_projection))  # noqa: E731
        out, mc, ms = _bam_ref.bam(x, mlp, spatial, combine=combine)
        acc = acc_dtype(x.dtype)
        return out, mc.to(acc), ms.to(acc)
    return _bam_op.bam(dense(x), mlp, spatial, primitives=primitives_for(backend, x), combine=combine,
                       spatial_projection=spatial_projection)


def _check_projection(x: Tensor, projection) -> None:
    """``(weight [R, C, 1, 1], bias [R] or None)`` in x's dtype and on its device."""
    if not isinstance(projection, (tuple, list)) or len(projection) != 2:
        raise TypeError("attnkern.bam: spatial_projection must be a (weight, bias) pair")
    w, b = projection
    C = x.shape[1]
    if not isinstance(w, Tensor) or w.dim() != 4 or w.shape[1:] != (C, 1, 1):
        got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"attnkern.bam: spatial_projection weight must be [R, {C}, 1, 1], got {got}")
    if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0],)):
        got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"attnkern.bam: spatial_projection bias must be [{w.shape[0]}] or None, got {got}")
    for name, t in (("weight", w), ("bias", b)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"attnkern.bam: spatial_projection {name} must have x's dtype and device "
                             f"({x.dtype}, {x.device}), got {t.dtype}, {t.device}")


ATTENTION_DTYPES = _attention_op.ATTENTION_DTYPES


def check_attention(op: str, q, k, v=None, attn_mask=None, *, dropout_p: float = 0.0,
                    is_causal: bool = False, scale=None, enable_gqa: bool = False) -> None:
    """Raise what ``torch.nn.functional.scaled_dot_product_attention`` raises (same exception
    types, our messages) unless q (N, ..., H_q, L, E), k (N, ..., H_k, S, E), v (N, ..., H_v,
    S, E_v) and the mask are what it takes: one floating dtype and device, batch dimensions
    that broadcast (H_k, H_v dividing H_q with ``enable_gqa``), a boolean, float32 or q-dtype
    mask broadcastable to (N, ..., H_q, L, S) or a ``CausalBias``, and not both a mask and
    ``is_causal``. See :func:`attnkern.ops.attention.resolve`."""
    _attention_op.resolve(op, q, k, v, attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                          enable_gqa=enable_gqa)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Scaled dot-product attention with ``torch.nn.functional.scaled_dot_product_attention``'s
    signature, keyword names and semantics: ``softmax(query @ key^T * scale + mask) @ value``.

    Args:
        query: (N, ..., H_q, L, E); key: (N, ..., H_k, S, E); value: (N, ..., H_v, S, E_v).
            Rank >= 2, batch dimensions broadcast as torch broadcasts them; one floating dtype
            and device; any strides (views cut from a packed qkv projection are read in place
            on the GPU).
        attn_mask: None, a boolean mask (True = attend), an additive float mask (float32 or
            query's dtype, may require grad) broadcastable to (N, ..., H_q, L, S) - e.g. a
            key-padding mask [B, 1, 1, S] for bags of tiles of different sizes - or a
            ``torch.nn.attention.bias.CausalBias`` (upper-left or lower-right, honoured without
            materialising it). Finite fills (``finfo.min``, -1e9) are the softmax of those
            finite scores: a row whose keys all carry the fill is uniform over them. Query rows
            with every key masked by -inf / False give zeros (as ATen).
        dropout_p: dropout on the attention probabilities. The flash kernels have none: with
            ``dropout_p > 0`` the call is handed to ATen's SDPA.
        is_causal: key j is attended by query i only if j <= i (top-left aligned). Not with a mask.
        scale: defaults to 1 / sqrt(E).
        enable_gqa: grouped-query attention: query head h reads kv head h // (H_q // H_k).
            The Triton kernels index the kv head (k and v are not repeated; dk and dv are
            summed over each group without atomics).

    Returns:
        (N, ..., H_q, L, E_v) in query's dtype. CUDA tensors run the Triton flash-attention
        kernels (float16, bfloat16, float32; head dims up to 256; deterministic backward, no
        atomics); CPU tensors run ATen's fused SDPA; float64 on the GPU and larger head dims
        run the reference.

    Raises:
        The exception types torch raises for the same misuse: ``RuntimeError`` for shapes,
        dtypes, devices and ``attn_mask`` with ``is_causal``; ``TypeError`` for arguments of
        the wrong type (and for tensor subclasses attnkern does not know, which it never
        reads); ``ValueError`` for a ``CausalBias`` with ``is_causal``.
    """
    op = "scaled_dot_product_attention"
    inp = _attention_op.resolve(op, query, key, value, attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    backend = _attention_op.pick_backend(inp.q, inp.v)
    return _attention_op.scaled_dot_product_attention(inp, float(dropout_p), scale, backend=backend)
