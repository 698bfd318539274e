"""Triton kernels of the attention maps: per-row log-sum-exp and the attention each key
receives, without an N_q x N_k matrix.

Same results as :mod:`attnkern.reference.attention_maps` (the ground truth) and the blockwise
PyTorch path of :mod:`attnkern.explain.attention`:

=================  ===========================================================================
``row_lse``        log-sum-exp of the scores of every query row, [B, H, N_q] float32
``received``       attention each key receives, averaged over the N_q queries, [B, H, N_k]
=================  ===========================================================================

Math (S = scale * q k^T + mask, P = softmax(S) over keys, rows with no key kept give P = 0):

- pass 1, ``_stats_kernel``: one program per (b, h, block of BLOCK_M queries) loops over the
  key blocks with an online max and sum (as flash attention's forward) and writes each row's
  score maximum m_i and log-sum log sum_j exp(S_ij - m_i) (both -inf for a row with no key
  kept); lse = m + log-sum. The two are kept apart, and scores stay in natural units (only
  differences S - m <= 0 are scaled by log2(e) for ``exp2``), because a finite fill such as
  ``finfo.min`` would overflow to -inf when scaled and would absorb the log-sum: a row whose
  keys all carry the fill is then uniform over them, as the softmax of the finite scores is.
- pass 2, ``_received_kernel``: one program per (b, h, block of BLOCK_N keys) loops over the
  query blocks, recomputes S for the tile and adds sum_i exp(S_ij - m_i) / l_i into a register
  accumulator of BLOCK_N floats; the result is divided by N_q (fully masked rows contribute
  0 and still count in N_q, as ``P.mean(dim=-2)`` of the reference). No atomics: every key is
  owned by one program and its sum runs over the query blocks in a fixed order, so two runs
  give bitwise-equal results.

Memory: besides q, k and the (possibly broadcast) mask, N_q floats of lse and the B*H*N_k
output; a program holds [BLOCK_M, BLOCK_N] scores in registers. Work: two q k^T products
(2 * 2 * B * H * N_q * N_k * D flops); causal masks skip the tiles above the diagonal.

Inputs:

- q [B, H, N_q, D] and k [B, H, N_k, D] of one dtype among ``SUPPORTED_DTYPES`` (float32,
  bfloat16, float16), any strides (views cut from a packed qkv are read without a copy). Scores
  are float32: ``tl.dot`` with float32 accumulation, ``input_precision="ieee"`` for float32
  inputs (no TF32), so the scores are those of ``q.float() @ k.float().T`` up to summation order.
  (Under the interpreter bfloat16 tiles are also upcast first: the interpreter's bfloat16
  ``tl.dot`` returns garbage in triton 3.8.)
- head dims up to ``MAX_HEAD_DIM`` (256), padded to a power of two (at least 16) and masked.
- any N_q, N_k >= 1 (ragged edges masked).
- ``mask``: None, or a [B, H, N_q, N_k] view (broadcast dimensions with stride 0, as
  :func:`attnkern.functional.broadcast_mask` gives) of a bool mask (True = keep) or of an
  additive float mask (float32 or q's dtype, added in float32); read through its strides.
- ``is_causal``: key j kept for query i when j <= i (top-left aligned, as ATen), or when
  j <= i + N_k - N_q with ``causal_lower_right`` (the diagonal aligned to the last key).

Offsets are 64-bit (batch, head and token indices widened before they meet a stride); grids
are one-dimensional. Block sizes depend on the shapes only (no autotuning, whose choice would
change the summation order between processes). Kernels launch on the tensors' GPU whatever the
current device is. Without a GPU they run under ``TRITON_INTERPRET=1`` on CPU tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import device_guard as _device_guard
from ._launch import interpret as _interpret

__all__ = ["SUPPORTED_DTYPES", "MAX_HEAD_DIM", "row_lse", "received", "supports"]

#: Input dtypes the kernels take; float64 goes to the blockwise PyTorch path or the reference.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The largest head dim (padded to a power of two inside the kernels).
MAX_HEAD_DIM = 256


# mask kinds (constexpr)
_NO_MASK, _BOOL_MASK, _ADD_MASK = 0, 1, 2


def _err(fn: str, msg: str) -> str:
    return f"attnkern.triton.attention_maps.{fn}: {msg}"


def supports(q: Tensor, k: Optional[Tensor] = None) -> Optional[str]:
    """None when the kernels take these inputs, else the reason they do not."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the triton attention-map kernels take float32, bfloat16 and float16, not {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the triton attention-map kernels take head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    return None


def _ieee(q: Tensor) -> bool:
    """Whether the tiles are multiplied in float32 (``input_precision="ieee"``): for float32
    inputs, and for bfloat16 under the interpreter, whose bfloat16 ``tl.dot`` returns garbage
    (triton 3.x; products of bfloat16 numbers are exact in float32, so the scores are the same
    up to summation order). On a GPU half inputs go to the tensor cores with float32 sums."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)


def _check(fn: str, q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(_err(fn, f"{name} must be a torch.Tensor, got {type(t).__name__}"))
        if t.dim() != 4:
            raise ValueError(_err(fn, f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}"))
        if not t.is_cuda and not (t.device.type == "cpu" and _interpret()):
            raise ValueError(_err(fn, f"{name} must be a CUDA tensor (CPU tensors only under "
                                      f"TRITON_INTERPRET=1), got device {t.device}"))
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(_err(fn, f"q and k must share dtype and device, got q {q.dtype} on {q.device}, "
                                  f"k {k.dtype} on {k.device}"))
    why = supports(q)
    if why:
        raise (TypeError if q.dtype not in SUPPORTED_DTYPES else ValueError)(_err(fn, why))
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(_err(fn, f"k must be [B, H, N_k, D] with q's B, H and D; got q {tuple(q.shape)}, "
                                  f"k {tuple(k.shape)}"))
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(_err(fn, f"N_q, N_k and D must be positive, got q {tuple(q.shape)}, "
                                  f"k {tuple(k.shape)}"))
    if mask is not None:
        if is_causal:
            raise ValueError(_err(fn, "give mask or is_causal=True, not both"))
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if tuple(mask.shape) != full:
            raise ValueError(_err(fn, f"mask must be a [B, H, N_q, N_k] = {list(full)} view, got "
                                      f"{tuple(mask.shape)} (expand it with broadcast_mask)"))
        if mask.dtype not in (torch.bool, torch.float32, q.dtype):
            raise TypeError(_err(fn, f"mask must be bool, float32 or q's dtype, got {mask.dtype}"))
        if mask.device != q.device:
            raise ValueError(_err(fn, f"mask must be on q's device {q.device}, got {mask.device}"))


class _Plan:
    """Tiling from the shapes and the precision of the products (float32 ``ieee`` or not):
    BLOCK_M queries x BLOCK_N keys x DP (padded head dim)."""

    def __init__(self, n_q: int, n_k: int, d: int, block_m: Optional[int], block_n: Optional[int],
                 ieee: bool = False):
        self.dp = max(16, triton.next_power_of_2(d))
        if ieee:
            # float32 products take tl.dot's FMA path with the operands in registers: 64 x 64
            # tiles spill on sm_80 and sm_90 at every head dim from 16 (stats, with a mask) to
            # 256 (up to 7.5 KB a thread); 32 x 32 (16 x 32 for head dim 256) compile without
            # spills for every mask kind on both (ptxas, benchmarks/compile_targets.py).
            bm = block_m or (32 if self.dp <= 128 else 16)
            bn = block_n or 32
        else:
            bm = block_m or (64 if self.dp <= 128 else 32)
            bn = block_n or 64
        for name, b in (("block_m", bm), ("block_n", bn)):
            if b < 16 or b & (b - 1):
                raise ValueError(_err("plan", f"{name} must be a power of two >= 16, got {b}"))
        # no bigger than the (padded) sequence, but at least 16 (tl.dot's smallest tile)
        self.block_m = max(16, min(bm, triton.next_power_of_2(n_q)))
        self.block_n = max(16, min(bn, triton.next_power_of_2(n_k)))
        # 8 warps from a 64 x 64 tile of a 64-wide head on (with 4, ptxas spilled the float32
        # score tile of the received pass, about 480 bytes a thread on sm_80 and sm_90), and
        # for float32 from a 64-wide head on
        self.num_warps = 8 if self.dp * max(self.block_m, self.block_n) >= 64 * 64 or (ieee and self.dp >= 64) else 4


def _mask_args(q: Tensor, mask: Optional[Tensor]):
    """(pointer tensor, 4 strides, kind) of the mask; bool is read as uint8 (same bytes)."""
    if mask is None:
        return q, 0, 0, 0, 0, _NO_MASK
    kind = _BOOL_MASK if mask.dtype == torch.bool else _ADD_MASK
    m = mask.view(torch.uint8) if kind == _BOOL_MASK else mask
    return (m, *m.stride(), kind)


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------

@triton.jit
def _scores(q, kt, m_ptr, smb, smh, smq, smk, b, h, offs_m, offs_n, N_Q, N_K, causal_off, scale,
            MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """Scores of a [BLOCK_M, BLOCK_N] tile in natural units, scale * q k^T + mask (a finite
    fill such as finfo.min stays finite), -inf where the key is masked, causal-hidden (key >
    query + causal_off) or past N_K. Rows past N_Q are left finite (callers mask)."""
    if IEEE:
        s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = s * scale
    keep = (offs_n < N_K)[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
    if MASK != 0:
        mp = (m_ptr + b * smb + h * smh + offs_m.to(tl.int64)[:, None] * smq
              + offs_n.to(tl.int64)[None, :] * smk)
        inb = (offs_m < N_Q)[:, None] & (offs_n < N_K)[None, :]
        if MASK == 1:
            mv = tl.load(mp, mask=inb, other=1)
            keep = keep & (mv != 0)
        else:
            s = s + tl.load(mp, mask=inb, other=0.0).to(tl.float32)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _exp2_diff(d):
    """exp(d) for a score difference d <= 0, as exp2(d * log2(e)) with d raised to -1e38 first
    so that the product stays finite (NaN stays NaN)."""
    return tl.exp2(tl.where(d < -1e38, -1e38, d) * 1.4426950408889634)


@triton.jit
def _stats_kernel(q_ptr, k_ptr, m_ptr, stats_ptr,
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smq, smk,
                  H, N_Q, N_K, D, NQB, causal_off, scale,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr):
    """Row maximum m and log-sum log(sum_j exp(S_ij - m)) of BLOCK_M query rows of one (b, h)
    over all keys (online max/sum); both -inf for a row with no key kept."""
    pid = tl.program_id(0)
    qb = pid % NQB
    bh = (pid // NQB).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DP)
    qp = (q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqn
          + offs_d.to(tl.int64)[None, :] * sqd)
    q = tl.load(qp, mask=(offs_m < N_Q)[:, None] & (offs_d < D)[None, :], other=0.0)
    kbase = k_ptr + b * skb + h * skh + offs_d.to(tl.int64)[:, None] * skd
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    hi = N_K
    if CAUSAL:  # keys past the block's last query (+ the diagonal's offset) are hidden from all its rows
        hi = tl.minimum(N_K, tl.maximum((qb + 1) * BLOCK_M + causal_off, 0))
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = tl.load(kbase + offs_n.to(tl.int64)[None, :] * skn,
                     mask=(offs_d < D)[:, None] & (offs_n < N_K)[None, :], other=0.0)
        s = _scores(q, kt, m_ptr, smb, smh, smq, smk, b, h, offs_m, offs_n, N_Q, N_K, causal_off, scale,
                    MASK, CAUSAL, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * _exp2_diff(m_i - m_safe) + tl.sum(_exp2_diff(s - m_safe[:, None]), 1)
        m_i = m_new
    # l_i = 0 only where m_i = -inf (no key kept): log-sum = -inf there, without a log(0)
    log_l = tl.where(l_i > 0, tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    sp = stats_ptr + (bh * N_Q + offs_m) * 2
    tl.store(sp, m_i, mask=offs_m < N_Q)
    tl.store(sp + 1, log_l, mask=offs_m < N_Q)


@triton.jit
def _received_kernel(q_ptr, k_ptr, m_ptr, stats_ptr, out_ptr,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smq, smk,
                     H, N_Q, N_K, D, NKB, causal_off, scale, inv_nq,
                     MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr):
    """sum_i exp(S_ij - m_i) / l_i / N_Q for BLOCK_N keys of one (b, h), queries in order."""
    pid = tl.program_id(0)
    kb = pid % NKB
    bh = (pid // NKB).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    kp = (k_ptr + b * skb + h * skh + offs_d.to(tl.int64)[:, None] * skd
          + offs_n.to(tl.int64)[None, :] * skn)
    kt = tl.load(kp, mask=(offs_d < D)[:, None] & (offs_n < N_K)[None, :], other=0.0)
    qbase = q_ptr + b * sqb + h * sqh + offs_d.to(tl.int64)[None, :] * sqd
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # queries before the block's first key (- the diagonal's offset) see none of its keys
        lo = (tl.maximum(kb * BLOCK_N - causal_off, 0) // BLOCK_M) * BLOCK_M
    for start in range(lo, N_Q, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        in_q = offs_m < N_Q
        q = tl.load(qbase + offs_m.to(tl.int64)[:, None] * sqn,
                    mask=in_q[:, None] & (offs_d < D)[None, :], other=0.0)
        sp = stats_ptr + (bh * N_Q + offs_m) * 2
        m = tl.load(sp, mask=in_q, other=float("-inf"))
        log_l = tl.load(sp + 1, mask=in_q, other=float("-inf"))
        # a row with no key kept (m = -inf) and padding rows contribute exp(-inf) = 0
        empty = m == float("-inf")
        m = tl.where(empty, 0.0, m)
        log_l = tl.where(empty, float("inf"), log_l)
        s = _scores(q, kt, m_ptr, smb, smh, smq, smk, b, h, offs_m, offs_n, N_Q, N_K, causal_off, scale,
                    MASK, CAUSAL, IEEE)
        d = s - m[:, None]
        acc += tl.sum(_exp2_diff(d) * tl.exp(-log_l)[:, None], 0)
    tl.store(out_ptr + bh * N_K + offs_n, acc * inv_nq, mask=offs_n < N_K)


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------

def _stats(q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool, causal_off: int, scale: float,
           plan: _Plan) -> Tensor:
    """[B, H, N_q, 2]: each row's score maximum m and log-sum log(sum_j exp(S_ij - m)), kept
    apart because a finite fill (finfo.min) absorbs the log-sum in m + log-sum."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    stats = torch.empty(B, H, N_Q, 2, dtype=torch.float32, device=q.device)
    if stats.numel() == 0:
        return stats
    m, smb, smh, smq, smk, kind = _mask_args(q, mask)
    nqb = triton.cdiv(N_Q, plan.block_m)
    with _device_guard(q):
        _stats_kernel[(B * H * nqb,)](
            q, k, m, stats, *q.stride(), *k.stride(), smb, smh, smq, smk,
            H, N_Q, N_K, D, nqb, int(causal_off), float(scale),
            MASK=kind, CAUSAL=bool(is_causal), IEEE=_ieee(q),
            BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, DP=plan.dp, num_warps=plan.num_warps)
    return stats


def _causal_off(q: Tensor, k: Tensor, lower_right: bool) -> int:
    return k.shape[2] - q.shape[2] if lower_right else 0


def row_lse(q: Tensor, k: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False,
            scale: Optional[float] = None, *, block_m: Optional[int] = None,
            block_n: Optional[int] = None, causal_lower_right: bool = False) -> Tensor:
    """The natural log-sum-exp of the scores of every query row: [B, H, N_q] float32, -inf for
    rows with no key kept (pass 1 alone)."""
    _check("row_lse", q, k, mask, is_causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    plan = _Plan(q.shape[2], k.shape[2], q.shape[3], block_m, block_n, _ieee(q))
    stats = _stats(q, k, mask, is_causal, _causal_off(q, k, causal_lower_right), scale, plan)
    return stats[..., 0] + stats[..., 1]


def received(q: Tensor, k: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False,
             scale: Optional[float] = None, *, block_m: Optional[int] = None,
             block_n: Optional[int] = None, causal_lower_right: bool = False) -> Tensor:
    """The attention each key receives, averaged over the N_q queries: [B, H, N_k] float32.

    ``mask`` is None or a [B, H, N_q, N_k] (broadcast) view, bool or additive float; see the
    module docstring. ``block_m`` / ``block_n`` override the tile (powers of two >= 16)."""
    _check("received", q, k, mask, is_causal)
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    plan = _Plan(N_Q, N_K, D, block_m, block_n, _ieee(q))
    out = torch.empty(B, H, N_K, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    off = _causal_off(q, k, causal_lower_right)
    stats = _stats(q, k, mask, is_causal, off, scale, plan)
    m, smb, smh, smq, smk, kind = _mask_args(q, mask)
    nkb = triton.cdiv(N_K, plan.block_n)
    with _device_guard(q):
        _received_kernel[(B * H * nkb,)](
            q, k, m, stats, out, *q.stride(), *k.stride(), smb, smh, smq, smk,
            H, N_Q, N_K, D, nkb, off, scale, 1.0 / N_Q,
            MASK=kind, CAUSAL=bool(is_causal), IEEE=_ieee(q),
            BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, DP=plan.dp, num_warps=plan.num_warps)
    return out
