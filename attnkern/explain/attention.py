"""Attention maps of a ViT without an N x N matrix.

A ViT over the 10^4-10^5 tissue tiles of a slide cannot keep its attention matrix (N = 16384
tokens is 1 GiB per head in float32). These two maps need O(N) memory:

- :func:`attention_rows`: the attention of chosen query rows (the CLS token: ``rows=0``) over
  all keys, [B, H, len(rows), N_k]. The scores of R rows are R x N_k numbers, the size of the
  result itself, so they are computed directly (scores of the selected rows in float32,
  a softmax over keys) with PyTorch on the ``cpu`` and ``triton`` backends alike: a kernel
  would save no memory and only launch overhead. (On CUDA these scores come from
  ``torch.matmul`` in float32, so ``torch.backends.cuda.matmul.allow_tf32``, off by default,
  applies.) On the ``reference`` backend the full P is materialised and indexed.
- :func:`attention_received`: for each key, the attention it receives averaged over the N_q
  queries, [B, H, N_k] = ``P.mean(dim=-2)``, in two blockwise passes over the scores:

  1. per query row the score maximum ``m_i`` and the sum ``l_i = sum_j exp(S_ij - m_i)``,
     from blocks of queries x blocks of keys (online max and sum);
  2. per block of keys ``sum_i exp(S_ij - m_i) / l_i`` over the blocks of queries (the scores
     are recomputed), then divided by N_q.

  Memory: the lse (B*H*N_q floats), the result (B*H*N_k) and one tile of scores
  (B*H*block^2 floats in the blockwise PyTorch path, one buffer reused for every tile;
  registers in the Triton kernels), never N_q x N_k. Both paths keep m and l apart (not one
  log-sum-exp) and the scores in natural units: a finite fill such as ``finfo.min`` or -1e9
  would absorb log l in m + log l, and would overflow to -inf if scaled by log2(e), so a row
  whose keys all carry the fill is uniform over them, the softmax of those finite scores.
  Work: two score products, 4*B*H*N_q*N_k*D flops; causal masks skip the tiles
  above the diagonal. The sums run in a fixed order (no atomics), so results are bitwise
  reproducible run to run.

**Fully masked query rows** (every key masked for that query) are rows of zeros of P: they
contribute 0 to every key and still count in the denominator N_q, exactly as
``P.mean(dim=-2)`` of the reference. (So the map of a key-padding-masked bag sums to the
fraction of queries that attend to anything, not to 1.) In :func:`attention_rows` such a row is
all zeros.

Inputs are those of ``torch.nn.functional.scaled_dot_product_attention``: q (N, ..., H, N_q, D)
and k (N, ..., H, N_k, D), any rank >= 2 with batch dimensions that broadcast (the maps have
the broadcast batch shape), of one floating dtype (float32, bfloat16, float16, float64) with any strides
(views cut from a packed qkv are read without a copy); ``attn_mask`` boolean (True = keep) or
additive float (float32 or q's dtype), broadcastable to [B, H, N_q, N_k]; ``is_causal`` keeps
key j for query i when j <= i (not together with a mask); ``scale`` defaults to 1/sqrt(D).
Scores and softmax are computed in float32 whatever the input dtype (float64 for float64), and
the maps are float32 (float64 for float64 input).

Backends (:func:`attnkern._backend.pick`; ``ATTNKERN_BACKEND`` forces one):

- ``triton``: CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``): the kernels of
  :mod:`attnkern.triton.attention_maps` (float32, bfloat16, float16; head dim <= 256).
- ``cpu``: CPU tensors: the blockwise PyTorch implementation of this module (no C++ extension
  needed; the tile edge is the ``block`` keyword).
- ``reference``: :mod:`attnkern.reference.attention_maps`, which materialises P (small inputs
  only); also where the Triton kernels cannot take the inputs (float64, head dim > 256).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _backend
from ..ops.attention import resolve
from ..reference.attention import broadcast_mask
from ..reference import attention_maps as _ref

__all__ = ["attention_rows", "attention_received"]

Rows = Union[int, Sequence[int], Tensor]

#: Default tile edge (queries and keys) of the blockwise PyTorch path: a tile of scores is
#: B*H*block^2 floats (4 MiB per head in float32).
DEFAULT_BLOCK = 1024


# ------------------------------------------------------------------------------------------
# argument handling
# ------------------------------------------------------------------------------------------

def _resolve(op: str, q, k, attn_mask, scale, is_causal):
    """:func:`attnkern.ops.attention.resolve` (torch's rules and exception types, any rank,
    ``CausalBias``) plus the maps' own rule: at least one query and one key."""
    if isinstance(scale, bool):
        raise TypeError(f"attnkern.{op}: scale must be a float or None, got bool")
    inp = resolve(op, q, k, None, attn_mask, is_causal=is_causal, scale=scale)
    if inp.q.shape[2] == 0 or inp.k.shape[2] == 0:
        raise ValueError(f"attnkern.{op}: q and k must hold at least one token each, got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    return inp


def _causal_offset(inp) -> Optional[int]:
    """None without causal masking, else the diagonal: key j kept for query i iff j <= i + offset."""
    if inp.causal is None:
        return None
    return inp.k.shape[2] - inp.q.shape[2] if inp.causal == "lower_right" else 0


def _check_block(op: str, block) -> int:
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"attnkern.{op}: block must be a positive int, got {block!r}")
    return int(block)


def _rows_index(op: str, rows: Rows, n_q: int, device: torch.device) -> Tensor:
    """``rows`` as a 1-D int64 tensor of indices in [0, n_q) on ``device`` (negatives wrapped)."""
    if isinstance(rows, Tensor):
        if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
            raise TypeError(f"attnkern.{op}: rows must be an integer tensor, got {rows.dtype}")
        if rows.dim() > 1:
            raise ValueError(f"attnkern.{op}: rows must be an int, a list of ints or a 0-D/1-D "
                             f"integer tensor, got a tensor of shape {tuple(rows.shape)}")
        idx = rows.detach().to("cpu", torch.long).reshape(-1)
    elif isinstance(rows, numbers.Integral) and not isinstance(rows, bool):
        idx = torch.tensor([int(rows)], dtype=torch.long)
    elif isinstance(rows, (list, tuple)):
        bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, numbers.Integral)]
        if bad:
            raise TypeError(f"attnkern.{op}: rows must hold ints, got {bad[0]!r} "
                            f"({type(bad[0]).__name__})")
        idx = torch.tensor([int(r) for r in rows], dtype=torch.long)
    else:
        raise TypeError(f"attnkern.{op}: rows must be an int, a list or tuple of ints or a 1-D "
                        f"integer tensor, got {type(rows).__name__}")
    if idx.numel() == 0:
        raise ValueError(f"attnkern.{op}: rows must name at least one query row")
    out = (idx < -n_q) | (idx >= n_q)
    if out.any():
        raise IndexError(f"attnkern.{op}: rows index {int(idx[out][0])} is out of range for "
                         f"N_q = {n_q} query rows (valid: {-n_q} .. {n_q - 1})")
    return torch.where(idx < 0, idx + n_q, idx).to(device)


def _triton_supports(q: Tensor):
    def supports(backend: str) -> Optional[str]:
        if backend == "triton":
            from ..triton import attention_maps as tm

            return tm.supports(q)
        return None
    return supports


def _pick(op: str, q: Tensor) -> str:
    """The backend of ``op`` for q. The ``cpu`` backend is the blockwise PyTorch path of this
    module: it needs no C++ extension, so it cannot be unavailable."""
    return _backend.pick(op, q.device, _triton_supports(q), extension=False)


def _detached(q: Tensor, k: Tensor, attn_mask: Optional[Tensor]):
    """The maps are for looking at, not for training: no autograd graph is recorded (so q and
    k taken from a model's forward pass, which require grad, need no ``torch.no_grad()``)."""
    return q.detach(), k.detach(), None if attn_mask is None else attn_mask.detach()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------
# blockwise PyTorch
# ------------------------------------------------------------------------------------------

class _Tiles:
    """Score tiles ``S = scale * q k^T + mask`` of q, k (natural units, -inf where masked),
    written into one reused buffer of B*H*block^2 elements (a fresh tile per step would cost
    page faults, which on CPU take longer than the tile's exponentials). ``causal``: None or
    the diagonal offset (key j kept for query i iff j <= i + causal)."""

    def __init__(self, q: Tensor, k: Tensor, attn_mask: Optional[Tensor], causal: Optional[int],
                 scale: float, block: int):
        self.q, self.k, self.causal = q, k, causal
        self.m4 = broadcast_mask(attn_mask, q, k) if attn_mask is not None else None
        self.cd = _acc(q.dtype)
        self.scale = scale
        B, H, n_q, _ = q.shape
        n_k = k.shape[2]
        self.buf = torch.empty(B * H * min(block, n_q) * min(block, n_k), dtype=self.cd,
                               device=q.device)

    def q_block(self, q0: int, q1: int) -> Tensor:
        return self.q[:, :, q0:q1].to(self.cd) * self.scale

    def k_block(self, k0: int, k1: int) -> Tensor:
        return self.k[:, :, k0:k1].to(self.cd).transpose(-2, -1)

    def scores(self, qb: Tensor, kbt: Tensor, q0: int, k0: int) -> Tensor:
        B, H, nq, _ = qb.shape
        nk = kbt.shape[-1]
        s = self.buf[:B * H * nq * nk].view(B, H, nq, nk)
        torch.matmul(qb, kbt, out=s)
        if self.m4 is not None:
            mt = self.m4[:, :, q0:q0 + nq, k0:k0 + nk]
            if mt.dtype == torch.bool:
                s.masked_fill_(mt.logical_not(), float("-inf"))
            else:
                s.add_(mt)
        elif self.causal is not None and k0 + nk - 1 > q0 + self.causal:  # the tile crosses the diagonal
            qi = torch.arange(q0, q0 + nq, device=s.device)
            kj = torch.arange(k0, k0 + nk, device=s.device)
            s.masked_fill_(kj[None, :] > qi[:, None] + self.causal, float("-inf"))
        return s


def _row_stats_blockwise(t: _Tiles, block: int):
    """Pass 1: each query row's score maximum m and sum l = sum_j exp(S_ij - m), [B, H, N_q]
    each, by an online max and sum over key tiles; m = -inf and l = 0 for rows with no key."""
    B, H, n_q, _ = t.q.shape
    n_k = t.k.shape[2]
    m_all = torch.empty(B, H, n_q, dtype=t.cd, device=t.q.device)
    l_all = torch.empty_like(m_all)
    for q0 in range(0, n_q, block):
        q1 = min(n_q, q0 + block)
        qb = t.q_block(q0, q1)
        m = torch.full((B, H, q1 - q0), float("-inf"), dtype=t.cd, device=t.q.device)
        l = torch.zeros_like(m)
        # keys past the last query (+ the diagonal's offset) are hidden
        hi = n_k if t.causal is None else max(0, min(n_k, q1 + t.causal))
        for k0 in range(0, hi, block):
            k1 = min(hi, k0 + block)
            s = t.scores(qb, t.k_block(k0, k1), q0, k0)
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
            l = l * torch.exp(m - m_safe) + s.sub_(m_safe[..., None]).exp_().sum(dim=-1)
            m = m_new
        m_all[:, :, q0:q1] = m
        l_all[:, :, q0:q1] = l
    return m_all, l_all


def _received_blockwise(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], causal: Optional[int],
                        scale: float, block: int) -> Tensor:
    """Pass 1 (:func:`_row_stats_blockwise`), then pass 2: per key block, sum over the query
    blocks (in order) of exp(S - m) / l, divided by N_q."""
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    t = _Tiles(q, k, attn_mask, causal, scale, block)
    m, l = _row_stats_blockwise(t, block)
    # a row with no key kept (m = -inf, l = 0) contributes exp(-inf) * 0 = 0
    empty = torch.isneginf(m)
    m = m.masked_fill_(empty, 0.0).unsqueeze(-1)
    inv_l = torch.where(empty, torch.zeros_like(l), 1.0 / l.masked_fill(empty, 1.0)).unsqueeze(-1)
    out = torch.empty(B, H, n_k, dtype=t.cd, device=q.device)
    for k0 in range(0, n_k, block):
        k1 = min(n_k, k0 + block)
        kbt = t.k_block(k0, k1)
        acc = torch.zeros(B, H, k1 - k0, dtype=t.cd, device=q.device)
        # earlier queries see none of these keys
        lo = 0 if causal is None else (max(0, k0 - causal) // block) * block
        for q0 in range(lo, n_q, block):
            q1 = min(n_q, q0 + block)
            s = t.scores(t.q_block(q0, q1), kbt, q0, k0)
            acc += s.sub_(m[:, :, q0:q1]).exp_().mul_(inv_l[:, :, q0:q1]).sum(dim=-2)
        out[:, :, k0:k1] = acc.div_(n_q)
    return out


def _rows_direct(q: Tensor, k: Tensor, idx: Tensor, attn_mask: Optional[Tensor], causal: Optional[int],
                 scale: float) -> Tensor:
    """The softmax over keys of the selected rows' scores; O(len(rows) * N_k), the size of the
    result. Rows with no key kept are zeros."""
    cd = _acc(q.dtype)
    s = q.index_select(2, idx).to(cd) @ k.to(cd).transpose(-2, -1)  # [B, H, R, N_k]
    s.mul_(scale)
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.shape[2] != 1:
            m = m.index_select(2, idx)
        if m.dtype == torch.bool:
            s.masked_fill_(~m, float("-inf"))
        else:
            s.add_(m)
    elif causal is not None:
        kj = torch.arange(k.shape[2], device=q.device)
        s.masked_fill_(kj[None, :] > idx[:, None] + causal, float("-inf"))
    # the maximum first, then exp(s - max) / sum: a finite fill stays finite (no log-sum-exp
    # that would absorb the sum); a row with every key at -inf keeps max = -inf -> zeros
    mx = s.amax(dim=-1, keepdim=True)
    s.sub_(mx.masked_fill(torch.isneginf(mx), 0.0)).exp_()
    den = s.sum(dim=-1, keepdim=True)
    return s.div_(den.masked_fill(den == 0, 1.0))


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------

def attention_rows(q: Tensor, k: Tensor, rows: Rows, attn_mask: Optional[Tensor] = None,
                   scale: Optional[float] = None, is_causal: bool = False) -> Tensor:
    """The attention probabilities of query rows ``rows`` over all keys.

    Args:
        q: queries (N, ..., H, N_q, D), any rank >= 2, any strides.
        k: keys (N, ..., H, N_k, D), q's dtype and device; batch dimensions broadcast with q's.
        rows: the query rows: an int (``0`` for a CLS token), a list or tuple of ints, or a
            0-D/1-D integer tensor; negative indices count from the end, as in Python.
        attn_mask: None, a bool mask (True = keep), an additive float mask, broadcastable to
            (N, ..., H, N_q, N_k) (as ``scaled_dot_product_attention`` takes it), or a
            ``torch.nn.attention.bias.CausalBias``.
        scale: the score scale, default 1/sqrt(D).
        is_causal: key j is kept for query i when j <= i (not together with ``attn_mask``).

    Returns:
        (N, ..., H, len(rows), N_k) float32 (float64 for float64 input): softmax over keys of
        the chosen rows' scores; a row with every key masked by -inf / False is all zeros, a
        row whose keys all carry a finite fill (finfo.min) is the softmax of those scores.
        Memory O(B*H*len(rows)*N_k): no other row's scores are computed.

    Raises:
        As :func:`attnkern.scaled_dot_product_attention` for q, k and the mask; ``TypeError``
        / ``IndexError`` for rows that are not integers / out of range.
    """
    op = "attention_rows"
    inp = _resolve(op, q, k, attn_mask, scale, is_causal)
    q4, k4, mask = _detached(inp.q, inp.k, inp.mask)
    idx = _rows_index(op, rows, q4.shape[2], q4.device)
    scale = 1.0 / math.sqrt(q4.shape[-1]) if scale is None else float(scale)
    causal = _causal_offset(inp)
    backend = _pick(op, q4)
    if backend == "reference":
        out = _ref.attention_rows(q4, k4, idx, mask, scale, causal is not None,
                                  lower_right=inp.causal == "lower_right")
    else:
        out = _rows_direct(q4, k4, idx, mask, causal, scale)
    return out.reshape(*inp.batch, idx.numel(), k4.shape[2])


def attention_received(q: Tensor, k: Tensor, attn_mask: Optional[Tensor] = None,
                       scale: Optional[float] = None, is_causal: bool = False, *,
                       block: int = DEFAULT_BLOCK) -> Tensor:
    """For each key, the attention it receives averaged over the N_q queries, in O(N) memory.

    ``P.mean(dim=-2)`` of the softmax probabilities P, computed in two blockwise passes from the
    per-row maximum and sum, never as an N_q x N_k matrix (see the module docstring). Query
    rows with every key masked contribute 0 and still count in the denominator N_q (the
    reference's ``P.mean(dim=-2)``, whose fully masked rows are zeros).

    Args:
        q, k, attn_mask, scale, is_causal: as :func:`attention_rows`.
        block: the tile edge (queries and keys) of the blockwise PyTorch path (CPU tensors): a
            tile of scores is B*H*block^2 floats. The Triton kernels choose their own tiles from
            the shapes.

    Returns:
        (N, ..., H, N_k) float32 (float64 for float64 input).
    """
    op = "attention_received"
    inp = _resolve(op, q, k, attn_mask, scale, is_causal)
    q4, k4, mask = _detached(inp.q, inp.k, inp.mask)
    block = _check_block(op, block)
    scale = 1.0 / math.sqrt(q4.shape[-1]) if scale is None else float(scale)
    causal = _causal_offset(inp)
    backend = _pick(op, q4)
    n_k = k4.shape[2]
    if backend == "reference":
        out = _ref.attention_received(q4, k4, mask, scale, causal is not None,
                                      lower_right=inp.causal == "lower_right")
    elif q4.shape[0] * q4.shape[1] == 0:
        out = torch.zeros(q4.shape[0], q4.shape[1], n_k, dtype=_acc(q4.dtype), device=q4.device)
    elif backend == "triton":
        from ..triton import attention_maps as tm

        m4 = broadcast_mask(mask, q4, k4) if mask is not None else None
        out = tm.received(q4, k4, m4, causal is not None, scale, causal_lower_right=inp.causal == "lower_right")
    else:
        out = _received_blockwise(q4, k4, mask, causal, scale, block)
    return out.reshape(*inp.batch, n_k)
