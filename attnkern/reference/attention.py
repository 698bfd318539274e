"""Pure-PyTorch reference of scaled dot-product attention: the ground truth of the tests and
the "naive" of the benchmarks. It materialises the [B, H, N_q, N_k] score matrix.

    S   = scale * q @ k^T + mask          (scale defaults to 1 / sqrt(D))
    P   = softmax(S) over keys            (rows with every key masked give P = 0, as ATen)
    out = P @ v
    lse = log(sum_k exp(S))               (-inf for fully masked rows)

Masks follow ``torch.nn.functional.scaled_dot_product_attention``: a boolean mask keeps the
positions where it is True, a float mask is added to the scores; either broadcasts to
[B, H, N_q, N_k]. ``is_causal`` keeps key j for query i when j <= i (top-left aligned, as ATen).

``upcast=True`` (the default) computes in float32 for half inputs (float64 stays float64):
the ground truth. ``upcast=False`` computes as plain PyTorch code would in the input dtype
(scores and P @ v in that dtype, the softmax in float32): the "same-dtype reference" of the
tolerance rule. Depends on nothing but torch.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["scaled_dot_product_attention", "causal_mask", "additive_mask", "broadcast_mask", "attention_probs"]


def causal_mask(n_q: int, n_k: int, device=None) -> Tensor:
    """Boolean [N_q, N_k]: True where key j may be attended by query i (j <= i)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def additive_mask(attn_mask: Optional[Tensor], is_causal: bool, n_q: int, n_k: int,
                  dtype: torch.dtype, device=None) -> Optional[Tensor]:
    """The mask as an additive float tensor of ``dtype`` in its own (broadcastable) shape:
    0 where kept and -inf where masked for boolean masks and ``is_causal``; float masks cast."""
    if is_causal:
        attn_mask = causal_mask(n_q, n_k, device)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
            ~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def broadcast_mask(attn_mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """A mask that broadcasts to [B, H, N_q, N_k] as a view of that shape (broadcast
    dimensions get stride 0: nothing is copied)."""
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    return torch.float32 if upcast else dtype


def attention_probs(q: Tensor, k: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                    scale: Optional[float] = None, *, upcast: bool = True) -> Tuple[Tensor, Tensor]:
    """``(P, lse)``: the attention probabilities [B, H, N_q, N_k] (float32, float64 for
    float64 input) and the log-sum-exp of each query row [B, H, N_q]."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cd = _compute_dtype(q.dtype, upcast)
    sd = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax dtype
    s = (q.to(cd) @ k.to(cd).transpose(-2, -1)) * scale
    s = s.to(sd)
    m = additive_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], sd, q.device)
    if m is not None:
        s = s + m
    # A softmax that stays finite, gradients included, on rows with every key masked.
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m).detach()
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (m + torch.log(denom)).squeeze(-1)
    return p, lse


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    upcast: bool = True,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention of q [..., N_q, D] over k [..., N_k, D] and v [..., N_k, D_v]; the output
    has q's dtype. With ``return_lse`` also the float32 log-sum-exp [..., N_q]."""
    p, lse = attention_probs(q, k, attn_mask, is_causal, scale, upcast=upcast)
    if dropout_p > 0.0:
        p = torch.dropout(p, dropout_p, train=True)
    cd = _compute_dtype(q.dtype, upcast)
    out = (p.to(cd) @ v.to(cd)).to(q.dtype)
    return (out, lse) if return_lse else out
