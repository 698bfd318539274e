"""Pure-PyTorch reference of scaled dot-product attention: the ground truth of the tests and
the "naive" of the benchmarks. It materialises the [B, H, N_q, N_k] score matrix.

    S   = scale * q @ k^T + mask          (scale defaults to 1 / sqrt(D))
    P   = softmax(S) over keys            (rows with every key masked give P = 0, as ATen)
    out = P @ v
    lse = log(sum_k exp(S))               (-inf for fully masked rows)

Masks follow ``torch.nn.functional.scaled_dot_product_attention``: a boolean mask keeps the
positions where it is True, a float mask is added to the scores (finite fills such as
``finfo.min`` or -1e9 included: a row whose keys all carry the fill is the softmax of those
finite scores, uniform when the fill absorbs q.k); either broadcasts to [..., N_q, N_k].
``is_causal`` keeps key j for query i when j <= i (top-left aligned, as ATen); a
``torch.nn.attention.bias.CausalBias`` mask is honoured by its variant (lower-right: j <= i +
N_k - N_q, the diagonal aligned to the last key) without reading its storage. Inputs of any
rank >= 2 broadcast their batch dimensions; ``enable_gqa`` repeats each kv head for its group
of query heads (dimension -3).

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

__all__ = ["scaled_dot_product_attention", "causal_mask", "causal_bias_variant", "additive_mask", "broadcast_mask",
           "attention_probs", "repeat_kv"]


def causal_mask(n_q: int, n_k: int, device=None, lower_right: bool = False) -> Tensor:
    """Boolean [N_q, N_k]: True where key j may be attended by query i: j <= i (upper-left),
    or j <= i + N_k - N_q with ``lower_right``."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q if lower_right else 0)


def causal_bias_variant(attn_mask) -> Optional[str]:
    """``"upper_left"`` or ``"lower_right"`` if ``attn_mask`` is a torch ``CausalBias``, else
    None (its storage is a placeholder: only the variant and the lengths mean anything)."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not isinstance(attn_mask, CausalBias):
        return None
    return "upper_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "lower_right"


def additive_mask(attn_mask: Optional[Tensor], is_causal: bool, n_q: int, n_k: int,
                  dtype: torch.dtype, device=None, *, lower_right: bool = False) -> Optional[Tensor]:
    """The mask as an additive float tensor of ``dtype`` in its own (broadcastable) shape:
    0 where kept and -inf where masked for boolean masks and ``is_causal`` (upper-left, or
    lower-right with ``lower_right``); float masks cast; a ``CausalBias`` by its variant."""
    variant = causal_bias_variant(attn_mask)
    if variant is not None:
        attn_mask, is_causal, lower_right = None, True, variant == "lower_right"
    if is_causal:
        attn_mask = causal_mask(n_q, n_k, device, lower_right)
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


def repeat_kv(q: Tensor, t: Tensor) -> Tensor:
    """Grouped-query attention: each kv head of ``t`` (dimension -3) repeated for its group of
    query heads, so ``t`` has q's head count."""
    hq, hk = q.shape[-3], t.shape[-3]
    if hq % hk != 0:
        raise RuntimeError(f"the number of kv heads ({hk}) must divide the number of query heads ({hq})")
    return t.repeat_interleave(hq // hk, dim=-3) if hq != hk else t


def attention_probs(q: Tensor, k: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                    scale: Optional[float] = None, *, upcast: bool = True,
                    lower_right: bool = False) -> Tuple[Tensor, Tensor]:
    """``(P, lse)``: the attention probabilities [..., N_q, N_k] (float32, float64 for
    float64 input) and the log-sum-exp of each query row [..., N_q]."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cd = _compute_dtype(q.dtype, upcast)
    sd = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax dtype
    s = (q.to(cd) @ k.to(cd).transpose(-2, -1)) * scale
    s = s.to(sd)
    m = additive_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], sd, q.device, lower_right=lower_right)
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
    enable_gqa: bool = False,
    *,
    upcast: bool = True,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention of q [..., N_q, D] over k [..., N_k, D] and v [..., N_k, D_v] (batch
    dimensions broadcast); the output has q's dtype. With ``return_lse`` also the float32
    log-sum-exp [..., N_q]."""
    if enable_gqa:
        k, v = repeat_kv(q, k), repeat_kv(q, v)
    p, lse = attention_probs(q, k, attn_mask, is_causal, scale, upcast=upcast)
    if dropout_p > 0.0:
        p = torch.dropout(p, dropout_p, train=True)
    cd = _compute_dtype(q.dtype, upcast)
    out = (p.to(cd) @ v.to(cd)).to(q.dtype)
    return (out, lse) if return_lse else out
