"""Hard attention by attention sampling (Katharopoulos and Fleuret, "Processing Megapixel
Images with Deep Attention-Sampling Models", ICML 2019): draw a few positions from an
attention distribution, compute the expensive features there only, and estimate the
attention-weighted sum of the features over all positions without bias.

Soft attention computes ``sum_i a_i f_i`` over every position i; hard attention reads K of
them. Positions are drawn without replacement, so no position is read twice: the Gumbel-top-k
trick (Vieira 2014; Kool, van Hoof and Welling 2019) ranks ``log a_i + G_i`` (G_i i.i.d.
standard Gumbel) and its top K, in decreasing order, are distributed exactly as K sequential
draws, each from the attention renormalised over the positions not yet drawn.

The estimator for sampling without replacement (Katharopoulos and Fleuret 2019, section 3.3,
as their reference code ``ats/core/expectation.py`` computes it with the default uniform
weights): with q_1 .. q_K the draws in order and c_{k-1} = a_{q_1} + ... + a_{q_{k-1}} the
attention already drawn,

    S_k = sum_{j<k} a_{q_j} f_{q_j} + (1 - c_{k-1}) f_{q_k}

is unbiased for every k (given the first k-1 draws, q_k follows a renormalised over the rest),
and the estimate is their mean S = (1/K) sum_k S_k. Collected per draw, S = sum_m w_m f_{q_m}
with

    w_m = ((1 - c_{m-1}) + (K - m) a_{q_m}) / K,          sum_m w_m = 1.

With K = N every position is drawn; the estimate is then the exhaustive sum itself (weights
``a``), which is also unbiased and has no variance (the mean of the S_k would still depend on
the order of the draws through S_1 = f_{q_1}). The same holds for a row with at most K
positions of positive attention: all of them are drawn, and its weights are its attention.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class AttentionSample(NamedTuple):
    """``indices`` [B, K] int64, positions in the order drawn; ``weights`` [B, K] (float64 for a
    float64 attention, float32 otherwise): ``(weights * f[b, indices]).sum(-1)`` is the unbiased
    estimate of ``sum_i a[b, i] f[b, i]``; ``attention`` [B, K]: the normalised attention of
    the drawn positions."""
    indices: torch.Tensor
    weights: torch.Tensor
    attention: torch.Tensor


_ZERO_OFFSET = 4096.0  # keys of zero-attention positions lie below every positive one (float64)


def attention_sample(attention: torch.Tensor, k: int, generator: Optional[torch.Generator] = None,
                     seed: Optional[int] = None) -> AttentionSample:
    """Draw ``k`` of N positions per row of ``attention`` [B, N] (or [N]) without replacement
    and return the weights of the unbiased estimator of Katharopoulos and Fleuret (2019), see
    the module docstring.

    ``attention``: non-negative, finite, floating; each row is normalised to sum to 1 here (so
    scores proportional to a distribution are fine). ``k``: 1 <= k <= N. The draw uses
    ``generator`` (a CPU ``torch.Generator``) or, if None, a new one seeded with ``seed`` (None:
    a random seed); the same generator state or seed gives the same draw.

    Positions of zero attention are drawn only after every position of positive attention (in
    a uniformly random order) and get weight 0; a row with at most k positions of positive
    attention (every row when k = N) is drawn whole and its weights are its attention, so its
    estimate is the exhaustive sum exactly. Errors: ``ValueError`` for k outside 1 .. N, a negative,
    NaN or infinite entry, or a row whose attention is all zero (no distribution); ``TypeError``
    for a non-floating attention or a non-int k."""
    name = "attnkern.explain.attention_sample"
    if not isinstance(attention, torch.Tensor):
        raise TypeError(f"{name}: attention must be a torch.Tensor, got {type(attention).__name__}")
    if not attention.is_floating_point():
        raise TypeError(f"{name}: attention must be a floating tensor, got {attention.dtype}")
    squeeze = attention.dim() == 1
    a = attention[None] if squeeze else attention
    if a.dim() != 2 or a.shape[1] == 0:
        raise ValueError(f"{name}: attention must be [B, N] (or [N]) with N >= 1, got shape {tuple(attention.shape)}")
    B, N = a.shape
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= N:
        raise ValueError(f"{name}: k must be in 1 .. N = {N} (draws without replacement), got {k}")
    a64 = a.detach().to(torch.float64)
    if not bool(torch.isfinite(a64).all()):
        raise ValueError(f"{name}: attention must be finite, got NaN or inf")
    if bool((a64 < 0).any()):
        raise ValueError(f"{name}: attention must be non-negative, got {float(a64.min()):g}")
    total = a64.sum(1, keepdim=True)
    empty = (total[:, 0] <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name}: attention row(s) {empty[:8]} are all zero: no distribution to draw from")
    p = a64 / total
    if generator is None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    tiny = torch.finfo(torch.float64).tiny
    u = torch.rand(B, N, generator=generator, dtype=torch.float64, device=generator.device)
    gumbel = -torch.log(-torch.log(u.clamp(tiny, 1 - 2 ** -53))).to(p.device)
    keys = torch.where(p > 0, torch.log(p) + gumbel, gumbel - _ZERO_OFFSET)
    indices = keys.topk(k, dim=1, sorted=True).indices                    # draw order
    pq = p.gather(1, indices)                                             # [B, K]
    drawn_before = torch.cumsum(pq, 1) - pq                               # c_{m-1}
    remaining = (1 - drawn_before).clamp_min(0)
    steps_after = torch.arange(k - 1, -1, -1, dtype=torch.float64, device=p.device)  # K - m
    weights = (remaining + steps_after * pq) / k
    # A row whose positive-attention positions all fit in the draw (always when k = N) is read
    # whole: its weights are the attention itself, the exhaustive sum.
    whole = ((p > 0).sum(1, keepdim=True) <= k)
    weights = torch.where(whole, pq, weights)
    out = torch.float64 if attention.dtype == torch.float64 else torch.float32
    indices, weights, pq = indices.to(attention.device), weights.to(attention.device, out), pq.to(attention.device, out)
    if squeeze:
        indices, weights, pq = indices[0], weights[0], pq[0]
    return AttentionSample(indices, weights, pq)


def sampled_expectation(sample: AttentionSample, features: torch.Tensor) -> torch.Tensor:
    """The estimate ``sum_m w_m f[q_m]`` from a draw and the features of the drawn positions,
    ``features`` [B, K, ...] (or [K, ...] for a 1-D draw) in draw order; [B, ...] (or [...]) in
    the features' dtype, accumulated in float32 or better."""
    w = sample.weights
    if features.shape[:w.dim()] != w.shape:
        raise ValueError(f"attnkern.explain.sampled_expectation: features must start with the draw's shape "
                         f"{tuple(w.shape)}, got {tuple(features.shape)}")
    acc = torch.promote_types(features.dtype, torch.float32)
    wf = w.to(acc).reshape(*w.shape, *([1] * (features.dim() - w.dim())))
    return (wf * features.to(acc)).sum(w.dim() - 1).to(features.dtype)
