"""Pure-PyTorch reference of the attention maps: the ground truth of the tests of
:mod:`attnkern.explain.attention`. It materialises the [B, H, N_q, N_k] probabilities P of
:func:`attnkern.reference.attention.attention_probs` (float32 for half inputs, float64 for
float64), so it needs O(N_q * N_k) memory: use it on small inputs only.

- ``attention_rows(q, k, rows, ...)``  = ``P[:, :, rows, :]``   [B, H, len(rows), N_k]
- ``attention_received(q, k, ...)``    = ``P.mean(dim=-2)``     [B, H, N_k]

Rows whose keys are all masked (-inf / False) are rows of zeros in P, so they add 0 to the mean and still
count in its denominator N_q. Depends on nothing but torch.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .attention import attention_probs

__all__ = ["attention_rows", "attention_received"]


def attention_rows(q: Tensor, k: Tensor, rows: Union[int, Sequence[int], Tensor],
                   attn_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                   is_causal: bool = False, *, lower_right: bool = False) -> Tensor:
    """The attention probabilities of query rows ``rows`` (an int, ints, or a 1-D integer
    tensor; negative indices count from the end) over all keys: [B, H, len(rows), N_k].
    ``lower_right``: causal masking aligned to the last key (j <= i + N_k - N_q)."""
    p, _ = attention_probs(q, k, attn_mask, is_causal, scale, lower_right=lower_right)
    idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1).to(p.device)
    return p.index_select(2, torch.where(idx < 0, idx + q.shape[2], idx))


def attention_received(q: Tensor, k: Tensor, attn_mask: Optional[Tensor] = None,
                       scale: Optional[float] = None, is_causal: bool = False, *,
                       lower_right: bool = False) -> Tensor:
    """The attention each key receives, averaged over the N_q queries: [B, H, N_k]."""
    p, _ = attention_probs(q, k, attn_mask, is_causal, scale, lower_right=lower_right)
    return p.mean(dim=-2)
