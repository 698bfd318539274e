"""attnkern's validated functional API: checks its arguments, picks a backend, calls the ops.

Backends (see :mod:`attnkern._backend`): CUDA tensors run the Triton kernels, CPU tensors the
C++ extension, anything else the pure-PyTorch reference; ``ATTNKERN_BACKEND`` forces one.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

from .ops import bam as _bam_op
from .ops import cbam as _cbam_op
from .ops import se as _se_op
from .ops.gating import FLOAT_DTYPES, acc_dtype, dense, pick_backend
from .reference import bam as _bam_ref
from .reference import cbam as _cbam_ref
from .reference import se as _se_ref

__all__ = ["cbam", "squeeze_excite", "bam", "check_feature_map"]


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
    return _cbam_op.cbam(dense(x), mlp, spatial, backend=backend, pool_order=pool_order, gate=gate)


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
    return _se_op.squeeze_excite(dense(x), mlp, backend=backend, gate=gate, add_maxpool=add_maxpool)


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
    return _bam_op.bam(dense(x), mlp, spatial, backend=backend, combine=combine)
