"""Triton flash attention: forward (output and softmax statistics) and backward, without atomics.

Same math as :mod:`attnkern.reference.attention` (the ground truth), for one [B, H] grid of
heads at a time::

    S   = scale * q @ k^T + mask          (mask additive, or causal: key j kept iff j <= i + off)
    P   = softmax(S) over keys            (rows with every key masked by -inf give P = 0, O = 0)
    O   = P @ v
    m   = max_j S_ij,  l = sum_j exp(S_ij - m)   (lse = m + log l)

=====================  =====================================================================
``attention_fwd``      O [B, H, Nq, Dv] in q's dtype and the statistics [B, H, Nq, 2] float32
                       (m and log l; :func:`lse_of` gives lse)
``attention_bwd``      dq, dk, dv and, if asked for, dS = P * (dP - delta), the gradient of an
                       additive mask, as a float32 [B, H, Nq, Nk] tensor
=====================  =====================================================================

Algorithm (FlashAttention-2; Dao 2023):

- **Forward.** One program per (batch * query head, block of BLOCK_M query rows) loops over key
  blocks of BLOCK_N keys with an online softmax: a running row maximum ``m``, a running sum
  ``l`` and an unnormalised accumulator ``acc`` [BLOCK_M, Dv], all float32, rescaled by
  ``exp(m_old - m_new)`` whenever the maximum grows. Exponentials are ``exp2`` of the score
  differences ``(S - m) * log2(e)``: the scores themselves stay in natural units. At the end
  O = acc / l, and m and log l are saved for backward (two float32 per query row).
- **Backward.** A pre-pass computes ``delta_i = sum_d O_id * dO_id`` (float32). Then two kernels
  recompute P = exp2((S - m) * log2(e) - log2 l) block by block: one program per (batch, kv
  head, key block) loops over the query heads of its group and their query blocks and
  accumulates dV += P^T dO and dK += dS^T q in registers; one program per query block loops
  over key blocks and accumulates dQ += dS k (and writes dS itself when the mask's gradient is
  wanted), with dP = dO v^T and dS = P * (dP - delta). Each gradient element is owned by
  exactly one program and summed in a fixed order: no atomics, bitwise reproducible run to run.
- **Huge finite masks.** Codes that pad with ``finfo.min`` or ``-1e9`` instead of -inf get the
  softmax of those finite scores: a row whose every key carries the fill is uniform over its
  keys (the fill absorbs q.k in float32). Hence the natural units (``finfo.min * log2(e)``
  would overflow to -inf), differences floored at -1e38 before the log2(e) scaling, and m and
  log l kept apart (m + log l rounds to m for such a row, and P recomputed from that lse would
  be 1 for every key).
- **Grouped-query attention.** k and v may have fewer heads than q (H a multiple of Hkv):
  query head h reads kv head h // (H // Hkv); nothing is repeated in memory, and dk, dv of a kv
  head are the sums over its group, formed in registers by the one program that owns them.
- **Precision.** Every score, exponential, sum and accumulator is float32 whatever the input
  dtype; for float16/bfloat16 the probabilities (and dS) are rounded to the input dtype just
  before the P @ V-style tensor-core products, as FlashAttention does. float32 inputs use
  ``tl.dot(..., input_precision="ieee")`` (no TF32), so they match a float64 reference as well
  as float32 PyTorch does.
- **Masks.** Causal masking keeps key j for query i iff j <= i + off: off = 0 is ``is_causal``
  (top-left aligned, as torch); off = Nk - Nq is the lower-right diagonal (aligned to the last
  key, as FlashAttention >= 2.1 and ``causal_lower_right``). Key blocks entirely beyond the
  diagonal are never visited (forward and dQ stop at it, dK/dV start at it), and only blocks
  that straddle it apply an element mask. An additive float mask is read through its four
  strides (an ``expand``-ed [B, 1, 1, Nk] key-padding mask costs no memory); it may hold -inf.
  Rows with every key masked by -inf have m = -inf: the kernels substitute a finite maximum so
  no ``-inf - -inf`` NaN appears, write O = 0 and m = log l = -inf, and the backward kernels
  treat those rows as P = 0, so they contribute no gradient anywhere.
- **Shapes.** Head dims 1..256, Dv independent of D: each is padded to a power of two (at least
  16, the smallest ``tl.dot`` tile) and the loads masked. Any Nq, Nk (ragged edges masked).
  q, k, v, dO and the mask are read through their strides (views cut from a packed qkv
  projection, even with a non-unit last stride, are taken without a copy); outputs are
  contiguous. Batch, head and row indices are widened to int64 before they meet a stride, and
  grids are one-dimensional (batch * heads * blocks on axis 0, no 65535 limit).
- **Tiles.** On a GPU the tile sizes, warps and pipeline stages are autotuned per (Nq, Nk
  rounded up to powers of two, D, Dv, dtypes, causal, mask) among configs pruned by an estimate
  of shared memory and registers (head dim 256 gets 64x32 tiles or smaller), then compiled for
  the device before they are timed: a config that spills registers or exceeds the shared memory
  per block is dropped (ptxas decides, not the estimate); if none is left, the fixed config. Under
  ``torch.use_deterministic_algorithms(True)`` and under ``TRITON_INTERPRET=1`` one fixed
  config chosen from the shapes only is used instead, so the summation order never depends on
  timing measured in another process. (Autotuned or not, a launch with the same config gives
  bitwise-equal results.)
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from ._launch import device_guard as _device_guard
from ._launch import interpret as _interpret

__all__ = ["SUPPORTED_DTYPES", "MAX_HEAD_DIM", "attention_fwd", "attention_bwd", "lse_of"]

#: Input dtypes the kernels take (q, k, v, dO); the ops layer sends any other to the reference.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The largest head dim (D of q and k, Dv of v) the kernels take.
MAX_HEAD_DIM = 256

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Fixed tiles under the interpreter: small, and different along queries and keys so that tests
# with a few dozen tokens already cover several blocks, ragged edges and diagonal blocks of
# causal attention that are not square.
_INTERP_FWD = (32, 16)      # (BLOCK_M queries, BLOCK_N keys)
_INTERP_DKV = (16, 32)
_INTERP_DQ = (32, 16)
_PRE_BLOCK_M = 64           # rows per program of the delta pre-pass

# Budgets of the autotune pruning. Shared memory: the device's own limit per block (A100 163 KiB,
# H100/H200 227 KiB; the A100's when no device answers, e.g. compiling ahead of time), against
# estimates that undercount what Triton allocates by up to a quarter (an estimated 180 KiB
# forward tile took 224 KiB on sm_80 and 256 KiB on sm_90), hence the margin. Registers: 255 per
# thread; the estimate counts float32 accumulator/tile words per thread. Both only spare compiles:
# on a GPU each candidate the estimates keep is compiled and dropped if ptxas spills registers.
_SMEM_FALLBACK = 163 * 1024
_SMEM_MARGIN = 1.25
_REG_BUDGET = 160


# ------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------


def _err(fn: str, msg: str) -> str:
    return f"attnkern.triton.attention.{fn}: {msg}"


class _Shape(NamedTuple):
    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    Dv: int


def _check_tensor(t, name: str, fn: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(_err(fn, f"{name} must be a torch.Tensor, got {type(t).__name__}"))


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, fn: str) -> _Shape:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(t, name, fn)
        if t.dim() != 4:
            raise ValueError(_err(fn, f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}"))
        if t.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
            raise TypeError(_err(fn, f"{name} must have dtype {names}; got {t.dtype}"))
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(_err(fn, f"{name} must have q's dtype {q.dtype}, got {t.dtype}"))
        if t.device != q.device:
            raise ValueError(_err(fn, f"{name} must be on q's device {q.device}, got {t.device}"))
    if not q.is_cuda and not (q.device.type == "cpu" and _interpret()):
        raise ValueError(_err(fn, f"q must be a CUDA tensor (CPU tensors only under "
                                  f"TRITON_INTERPRET=1), got device {q.device}"))
    B, H, Nq, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D or Hkv == 0 or H % Hkv != 0:
        raise ValueError(_err(fn, f"k must be [B, Hkv, Nk, D] = [{B}, Hkv, Nk, {D}] with Hkv dividing "
                                  f"q's {H} heads, to match q {tuple(q.shape)}; got {tuple(k.shape)}"))
    Nk = k.shape[2]
    if tuple(v.shape[:3]) != (B, Hkv, Nk):
        raise ValueError(_err(fn, f"v must be [B, Hkv, Nk, Dv] = [{B}, {Hkv}, {Nk}, Dv] to match k "
                                  f"{tuple(k.shape)}, got {tuple(v.shape)}"))
    Dv = v.shape[3]
    for name, d in (("q and k", D), ("v", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(_err(fn, f"the head dim of {name} must be in 1..{MAX_HEAD_DIM}, got {d}"))
    if max(Nq, Nk) >= 2**31:
        raise ValueError(_err(fn, f"sequence lengths must be below 2**31, got Nq={Nq}, Nk={Nk}"))
    return _Shape(B, H, Nq, Nk, D, Dv)


def _check_mask(mask: Optional[Tensor], q: Tensor, S: _Shape, is_causal: bool, fn: str) -> None:
    if mask is None:
        return
    _check_tensor(mask, "mask", fn)
    if mask.dtype not in (torch.float32, q.dtype):
        raise TypeError(_err(fn, f"mask must be an additive float mask of dtype float32 or q's "
                                 f"dtype {q.dtype}, got {mask.dtype} (convert boolean masks first)"))
    if tuple(mask.shape) != (S.B, S.H, S.Nq, S.Nk):
        raise ValueError(_err(fn, f"mask must be broadcast (expand) to [B, H, Nq, Nk] = "
                                  f"{[S.B, S.H, S.Nq, S.Nk]}, got shape {tuple(mask.shape)}"))
    if mask.device != q.device:
        raise ValueError(_err(fn, f"mask must be on q's device {q.device}, got {mask.device}"))
    if is_causal:
        raise ValueError(_err(fn, "pass either mask or is_causal, not both"))


def _check_like(t: Tensor, name: str, shape, dtype: torch.dtype, device, fn: str) -> None:
    _check_tensor(t, name, fn)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(_err(fn, f"{name} must be a {dtype} tensor of shape {list(shape)} on {device}; "
                                  f"got {t.dtype}, shape {tuple(t.shape)}, device {t.device}"))


# ------------------------------------------------------------------------------------------
# tile plans
# ------------------------------------------------------------------------------------------

def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _bucket(n: int) -> int:
    """Sequence lengths as the autotuner sees them: the next power of two (at least 16), so
    bags of tiles of many different sizes do not each trigger a new tuning run."""
    return max(16, triton.next_power_of_2(max(1, n)))


def _use_fixed() -> bool:
    return _interpret() or torch.are_deterministic_algorithms_enabled()


class _Fixed(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# The fixed GPU tiles, by the larger padded head dim: (fp16/bf16 tile, float32 tile), each
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen from ahead-of-time compiles for sm_80 and
# sm_90 (triton.compile for GPUTarget("cuda", 80 | 90, 32), registers and spill bytes from
# ptxas' log): the largest tile that compiles without register spills and within the shared
# memory of both, for every launch the kernel can get at that head dim (causal, additive,
# boolean and trainable masks, a float32 mask beside half-precision q/k/v, grouped-query heads).
# float32 takes the FMA path of tl.dot (input_precision="ieee"), whose operands live in
# registers, hence its smaller tiles; there ptxas' verdict is not monotonic in the tile (dK/dV
# at D128 spills at 32x16 with 3 stages, not with 1). Chosen with Triton 3.8 / ptxas 12.9;
# tests/triton/test_compile_targets.py re-judges them. Not timed on a GPU; the autotuner times
# its own candidates.
_FIXED_FWD = {16: ((128, 32, 8, 3), (64, 32, 8, 2)), 32: ((128, 32, 8, 3), (64, 32, 8, 2)),
              64: ((128, 64, 8, 3), (32, 64, 8, 3)), 128: ((128, 32, 8, 3), (32, 32, 8, 2)),
              256: ((64, 32, 8, 2), (16, 16, 4, 1))}
# dK/dV: block_m queries per step, block_n keys per program.
_FIXED_DKV = {16: ((64, 64, 8, 3), (16, 32, 8, 2)), 32: ((32, 128, 8, 3), (16, 32, 8, 2)),
              64: ((128, 32, 8, 3), (16, 32, 8, 2)), 128: ((32, 64, 8, 3), (32, 16, 8, 1)),
              256: ((32, 32, 8, 2), (32, 16, 8, 2))}
# dQ: block_m queries per program, block_n keys per step.
_FIXED_DQ = {16: ((128, 32, 8, 3), (64, 32, 8, 2)), 32: ((128, 32, 8, 3), (64, 32, 8, 2)),
             64: ((32, 128, 8, 3), (32, 64, 8, 3)), 128: ((64, 32, 8, 3), (32, 16, 8, 3)),
             256: ((32, 32, 8, 2), (16, 32, 8, 1))}


def _fixed_tile(table, interp_tile, bd: int, bdv: int, esize: int) -> _Fixed:
    if _interpret():
        return _Fixed(*interp_tile, 4, 1)
    half, single = table[max(bd, bdv)]  # powers of two in 16..MAX_HEAD_DIM (_block_d)
    return _Fixed(*(half if esize == 2 else single))


def _fixed_fwd(bd: int, bdv: int, esize: int) -> _Fixed:
    """The forward tile when not autotuning: from the padded head dims and element size only."""
    return _fixed_tile(_FIXED_FWD, _INTERP_FWD, bd, bdv, esize)


def _fixed_dkv(bd: int, bdv: int, esize: int) -> _Fixed:
    """dK/dV tile (block_m: queries per step, block_n: keys per program)."""
    return _fixed_tile(_FIXED_DKV, _INTERP_DKV, bd, bdv, esize)


def _fixed_dq(bd: int, bdv: int, esize: int) -> _Fixed:
    """dQ tile (block_m: queries per program, block_n: keys per step)."""
    return _fixed_tile(_FIXED_DQ, _INTERP_DQ, bd, bdv, esize)


def _esize(named_args: Dict, kwargs: Dict) -> int:
    q = named_args.get("Q")
    return 4 if q is None or q.dtype == torch.float32 else 2


def _smem_fwd(c: _Fixed, bd: int, bdv: int, es: int) -> int:
    return es * (c.block_m * bd + c.num_stages * c.block_n * (bd + bdv) + c.block_m * c.block_n)


def _regs_fwd(c: _Fixed, bd: int, bdv: int, es: int) -> float:
    return (c.block_m * bdv + 2 * c.block_m * c.block_n + c.block_m * bd * es / 4) / (32 * c.num_warps)


def _smem_dkv(c: _Fixed, bd: int, bdv: int, es: int) -> int:
    return es * (c.block_n * (bd + bdv) + c.num_stages * c.block_m * (bd + bdv) + 2 * c.block_m * c.block_n)


def _regs_dkv(c: _Fixed, bd: int, bdv: int, es: int) -> float:
    return (c.block_n * (bd + bdv) * (1 + es / 4) + 3 * c.block_m * c.block_n) / (32 * c.num_warps)


def _smem_dq(c: _Fixed, bd: int, bdv: int, es: int) -> int:
    return es * (c.block_m * (bd + bdv) + c.num_stages * c.block_n * (bd + bdv) + 2 * c.block_m * c.block_n)


def _regs_dq(c: _Fixed, bd: int, bdv: int, es: int) -> float:
    return (c.block_m * bd + c.block_m * (bd + bdv) * es / 4 + 3 * c.block_m * c.block_n) / (32 * c.num_warps)


def _configs(tiles, warps, stages) -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for (m, n) in tiles for w in warps for s in stages]


_FWD_CONFIGS = _configs([(128, 64), (128, 32), (64, 64), (64, 32), (128, 128), (32, 32)], [4, 8], [2, 3, 4])
_DKV_CONFIGS = _configs([(32, 128), (32, 64), (64, 64), (64, 128), (32, 32), (16, 32)], [4, 8], [2, 3])
_DQ_CONFIGS = _configs([(128, 32), (64, 32), (64, 64), (128, 64), (32, 32), (32, 16)], [4, 8], [2, 3])


def _smem_budget(q) -> int:
    """Shared memory per block of q's device (opt-in maximum), or the A100's."""
    try:
        return int(torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin)
    except Exception:  # no device (ahead-of-time compiles, the interpreter): the smallest target
        return _SMEM_FALLBACK


def _fits_compiled(kernel, named_args: Dict, kwargs: Dict, cfg) -> Optional[bool]:
    """Whether ``cfg`` fits the GPU of the launch, by compiling it there: True when ptxas spilled
    no register and the shared memory fits the block limit, False when it did not; None where
    there is nothing to ask (no CUDA tensor, the interpreter) or the compile could not say.

    ptxas is the only exact judge of register allocation; an estimate is off somewhere among
    the architectures, dtypes, head dims and mask kinds. Autotuning compiles every candidate it
    benchmarks anyway and Triton keeps the binary, so asking first costs little.
    """
    q = named_args.get("Q")
    if _interpret() or not isinstance(q, Tensor) or q.device.type != "cuda":
        return None
    opts = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    try:
        with _device_guard(q):
            compiled = kernel.run(*named_args.values(), grid=(1,), warmup=True, **opts, **cfg.all_kwargs())
            compiled._init_handles()
    except OutOfResources:
        return False
    except Exception:  # noqa: BLE001 - a probe that cannot tell leaves the choice to the tuner
        return None
    spills = getattr(compiled, "n_spills", None)
    return None if spills is None else spills == 0


def _make_pruner(smem, regs, fixed, kernel_name: str):
    """An ``early_config_prune`` keeping at most 8 configs (the largest tiles first) whose
    estimated shared memory and registers fit and which, on a GPU, compile there without
    register spills or too much shared memory (:func:`_fits_compiled`); the fixed config if none
    does. ``prune.fallback(named_args, **kwargs)`` is that fixed config."""

    def fallback(named_args, **kwargs):
        f = fixed(kwargs["BLOCK_D"], kwargs["BLOCK_DV"], _esize(named_args, kwargs))
        return triton.Config({"BLOCK_M": f.block_m, "BLOCK_N": f.block_n},
                             num_warps=f.num_warps, num_stages=f.num_stages)

    def prune(configs, named_args, **kwargs):
        bd, bdv = kwargs["BLOCK_D"], kwargs["BLOCK_DV"]
        es = _esize(named_args, kwargs)
        budget = _smem_budget(named_args.get("Q"))
        estimated = []
        # float32 runs tl.dot on the FMA path, operands in registers: only the fixed tile, chosen
        # from ptxas' figures, compiles without spills; the tuner gets it alone.
        for cfg in configs if es == 2 else []:
            c = _Fixed(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)
            if smem(c, bd, bdv, es) * _SMEM_MARGIN <= budget and regs(c, bd, bdv, es) <= _REG_BUDGET:
                estimated.append(cfg)
        estimated.sort(key=lambda cfg: -cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"])
        kernel = globals()[kernel_name]
        keep = []
        for cfg in estimated:
            if len(keep) == 8:
                break
            if _fits_compiled(kernel, named_args, kwargs, cfg) is not False:
                keep.append(cfg)
        return keep or [fallback(named_args, **kwargs)]

    prune.fallback = fallback
    return prune


_TUNE_KEY = ["NQ_BUCKET", "NK_BUCKET", "D", "DV", "IS_CAUSAL", "HAS_MASK"]


def _dot_precision(dtype: torch.dtype) -> str:
    """``PREC`` of the kernels (see ``_dot``)."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and _interpret():
        return "upcast"
    return "default"


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with float32 accumulation. PREC: "ieee" for float32 operands (exact products, no
    TF32); "default" for half operands (tensor cores; the setting only concerns float32);
    "upcast" for bfloat16 under the interpreter, whose tl.dot multiplies bfloat16's raw uint16
    storage: the operands are upcast to float32 first (bfloat16 products are exact in float32,
    so only the summation order can differ from the tensor-core product)."""
    if PREC == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PREC == "ieee":
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _floor(d):
    """A score difference (<= 0) raised to -1e38, so that scaling it by log2(e) stays finite
    (exp2 of either is 0); NaN stays NaN."""
    return tl.where(d < -1e38, -1e38, d)


@triton.jit
def _fwd_steps(acc, l_i, m_i, q, k_base, v_base, msk_base, offs_m, offs_d, offs_dv, lo, hi,
               Nq, Nk, causal_off, skn, skd, svn, svd, smm, smn, scale,
               D: tl.constexpr, DV: tl.constexpr, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
               EDGE: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax steps over key blocks [lo, hi). EDGE: the blocks may hold keys past Nk or
    above the causal diagonal, so apply the element mask. Scores are in natural units (a
    finite mask such as finfo.min stays finite); only differences to the running maximum,
    which are <= 0, are scaled by log2(e) for exp2."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_n64 = offs_n.to(tl.int64)
        in_k = offs_n < Nk
        k = tl.load(k_base + offs_n64[:, None] * skn + offs_d[None, :] * skd,
                    mask=in_k[:, None] & (offs_d < D)[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PREC) * scale
        if HAS_MASK:
            mm = tl.load(msk_base + offs_m.to(tl.int64)[:, None] * smm + offs_n64[None, :] * smn,
                         mask=(offs_m < Nq)[:, None] & in_k[None, :], other=0.0)
            s += mm.to(tl.float32)
        if EDGE:
            keep = in_k[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every key masked so far keeps m = -inf; subtract 0 there instead (no NaN).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(_floor(s - m_use[:, None]) * _LOG2E)
        alpha = tl.math.exp2(_floor(m_i - m_use) * _LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n64[:, None] * svn + offs_dv[None, :] * svd,
                    mask=in_k[:, None] & (offs_dv < DV)[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _causal_fwd_range(m0, Nk, causal_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(end of the key blocks every row of the query block [m0, m0 + BLOCK_M) sees in full,
    end of the keys any of its rows sees) under the diagonal key <= query + causal_off."""
    first = tl.maximum(m0 + causal_off + 1, 0)          # keys [0, first) seen by every row
    full_hi = tl.minimum((Nk // BLOCK_N) * BLOCK_N, (first // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(Nk, tl.maximum(m0 + BLOCK_M + causal_off, 0))
    return full_hi, tl.maximum(hi, full_hi)


@triton.jit
def _attn_fwd_kernel(Q, K, V, M, O, STATS,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     smb, smh, smm, smn, sob, soh, som, sod,
                     H, GROUP, Nq, Nk, causal_off, scale, NQ_BUCKET, NK_BUCKET,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O and the softmax statistics for BLOCK_M query rows of one (batch, query head); the
    query head h reads kv head h // GROUP. The largest query blocks (the most work under
    causal masking) get the lowest program ids."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Nq, BLOCK_M)
    bh = pid // num_m
    mb = num_m - 1 - pid % num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    m0 = mb * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    in_m = offs_m < Nq
    q = tl.load(Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd,
                mask=in_m[:, None] & (offs_d < D)[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    msk_base = M + b * smb + h * smh
    full_hi = (Nk // BLOCK_N) * BLOCK_N
    hi = Nk
    if IS_CAUSAL:
        full_hi, hi = _causal_fwd_range(m0, Nk, causal_off, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, msk_base, offs_m, offs_d, offs_dv,
                               0, full_hi, Nq, Nk, causal_off, skn, skd, svn, svd, smm, smn, scale,
                               D, DV, HAS_MASK, IS_CAUSAL, False, PREC, BLOCK_N)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_base, v_base, msk_base, offs_m, offs_d, offs_dv,
                               full_hi, hi, Nq, Nk, causal_off, skn, skd, svn, svd, smm, smn, scale,
                               D, DV, HAS_MASK, IS_CAUSAL, True, PREC, BLOCK_N)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    log_l = tl.where(empty, float("-inf"), tl.math.log2(l_safe) * _LN2)
    tl.store(O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * som + offs_dv[None, :] * sod,
             o.to(O.dtype.element_ty), mask=in_m[:, None] & (offs_dv < DV)[None, :])
    st = STATS + (bh.to(tl.int64) * Nq + offs_m) * 2
    tl.store(st, m_i, mask=in_m)
    tl.store(st + 1, log_l, mask=in_m)


@triton.jit
def _load_stats(STATS, row0, offs_m, in_m):
    """(m, log2 l) of query rows for P = exp2((S - m) * log2(e) - log2 l): m = 0 and
    log2 l = +inf (so P = 0) for rows with every key masked and rows past Nq."""
    st = STATS + (row0 + offs_m) * 2
    m = tl.load(st, mask=in_m, other=float("-inf"))
    log_l = tl.load(st + 1, mask=in_m, other=float("-inf"))
    empty = m == float("-inf")
    return tl.where(empty, 0.0, m), tl.where(empty, float("inf"), log_l * _LOG2E)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, H, Nq,
                      sob, soh, som, sod, sdb, sdh, sdm, sdd,
                      DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(O * dO) in float32 for BLOCK_M rows of one (batch, head)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Nq, BLOCK_M)
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    mask = (offs_m < Nq)[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m64[:, None] * som + offs_dv[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m64[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _dkv_steps(dk, dv, k, v, q_base, do_base, msk_base, stats_base, delta_base, offs_n, offs_d, offs_dv,
               lo, hi, Nq, Nk, causal_off, sqm, sqd, sdm, sdd, smm, smn, scale,
               D: tl.constexpr, DV: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL_EDGE: tl.constexpr,
               PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK/dV contributions of query blocks [lo, hi) of one query head, computed transposed
    ([keys, queries]). Keys past Nk need no mask (their rows are never stored); query rows
    past Nq get P = 0."""
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_m64 = offs_m.to(tl.int64)
        in_m = offs_m < Nq
        q = tl.load(q_base + offs_m64[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=in_m[:, None] & (offs_d < D)[None, :], other=0.0)
        do = tl.load(do_base + offs_m64[:, None] * sdm + offs_dv[None, :] * sdd,
                     mask=in_m[:, None] & (offs_dv < DV)[None, :], other=0.0)
        m_row, log2_l = _load_stats(stats_base, 0, offs_m64, in_m)
        delta = tl.load(delta_base + offs_m, mask=in_m, other=0.0)
        st = _dot(k, tl.trans(q), PREC) * scale
        if HAS_MASK:
            # -inf past Nk and Nq: a padded key must not meet the row max of a filled row
            # (S - m would overflow; those rows are never stored either way)
            mm = tl.load(msk_base + offs_m64[None, :] * smm + offs_n.to(tl.int64)[:, None] * smn,
                         mask=in_m[None, :] & (offs_n < Nk)[:, None], other=float("-inf"))
            st += mm.to(tl.float32)
        if CAUSAL_EDGE:
            st = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, st, float("-inf"))
        pt = tl.math.exp2(_floor(st - m_row[None, :]) * _LOG2E - log2_l[None, :])
        dv += _dot(pt.to(do.dtype), do, PREC)
        dpt = _dot(v, tl.trans(do), PREC)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkv_kernel(Q, K, V, M, DO, STATS, DELTA, DK, DV_OUT,
                         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                         smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                         H, GROUP, Nq, Nk, causal_off, scale, NQ_BUCKET, NK_BUCKET,
                         D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV of BLOCK_N keys of one (batch, kv head), looping over the GROUP query heads
    that read that kv head and over their query blocks: the group's sum is formed in
    registers, in a fixed order, without atomics."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(Nk, BLOCK_N)
    hkv = H // GROUP
    bhk = pid // num_n
    b = (bhk // hkv).to(tl.int64)
    hk = (bhk % hkv).to(tl.int64)
    n0 = (pid % num_n) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    in_n = offs_n < Nk
    kmask = in_n[:, None] & (offs_d < D)[None, :]
    vmask = in_n[:, None] & (offs_dv < DV)[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n64[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n64[:, None] * svn + offs_dv[None, :] * svd, mask=vmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = 0
    mid = 0
    if IS_CAUSAL:
        # Query i sees key j iff j <= i + causal_off: queries before n0 - causal_off see none of
        # the block; query blocks starting before its last key's first query straddle the
        # diagonal and need the element mask.
        first_q = tl.maximum(n0 - causal_off, 0)
        lo = tl.minimum((first_q // BLOCK_M) * BLOCK_M, Nq)
        last_q = tl.maximum(n0 + BLOCK_N - 1 - causal_off, 0)
        mid = tl.minimum(tl.cdiv(last_q, BLOCK_M) * BLOCK_M, Nq)
        mid = tl.maximum(mid, lo)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        msk_base = M + b * smb + h * smh
        stats_base = STATS + bh * Nq * 2
        delta_base = DELTA + bh * Nq
        if IS_CAUSAL:
            dk, dv = _dkv_steps(dk, dv, k, v, q_base, do_base, msk_base, stats_base, delta_base,
                                offs_n, offs_d, offs_dv, lo, mid, Nq, Nk, causal_off,
                                sqm, sqd, sdm, sdd, smm, smn, scale, D, DV, HAS_MASK, True, PREC, BLOCK_M)
        dk, dv = _dkv_steps(dk, dv, k, v, q_base, do_base, msk_base, stats_base, delta_base,
                            offs_n, offs_d, offs_dv, mid, Nq, Nq, Nk, causal_off,
                            sqm, sqd, sdm, sdd, smm, smn, scale, D, DV, HAS_MASK, False, PREC, BLOCK_M)
    out = bhk.to(tl.int64) * Nk * D + offs_n64[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    out = bhk.to(tl.int64) * Nk * DV + offs_n64[:, None] * DV + offs_dv[None, :]
    tl.store(DV_OUT + out, dv.to(DV_OUT.dtype.element_ty), mask=vmask)


@triton.jit
def _dq_steps(dq, q, do, m_row, log2_l, delta, k_base, v_base, msk_base, dm_base, offs_m, offs_d, offs_dv,
              lo, hi, Nq, Nk, causal_off, skn, skd, svn, svd, smm, smn, scale,
              D: tl.constexpr, DV: tl.constexpr, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
              EDGE: tl.constexpr, NEED_DMASK: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ contributions of key blocks [lo, hi); writes dS to the mask gradient if asked."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_n64 = offs_n.to(tl.int64)
        in_k = offs_n < Nk
        k = tl.load(k_base + offs_n64[:, None] * skn + offs_d[None, :] * skd,
                    mask=in_k[:, None] & (offs_d < D)[None, :], other=0.0)
        v = tl.load(v_base + offs_n64[:, None] * svn + offs_dv[None, :] * svd,
                    mask=in_k[:, None] & (offs_dv < DV)[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PREC) * scale
        if HAS_MASK:
            mm = tl.load(msk_base + offs_m.to(tl.int64)[:, None] * smm + offs_n64[None, :] * smn,
                         mask=(offs_m < Nq)[:, None] & in_k[None, :], other=0.0)
            s += mm.to(tl.float32)
        if EDGE:
            keep = in_k[None, :]
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(_floor(s - m_row[:, None]) * _LOG2E - log2_l[:, None])
        dp = _dot(do, tl.trans(v), PREC)
        ds = p * (dp - delta[:, None])
        if NEED_DMASK:
            tl.store(dm_base + offs_m.to(tl.int64)[:, None] * Nk + offs_n64[None, :], ds,
                     mask=(offs_m < Nq)[:, None] & in_k[None, :])
        dq += _dot(ds.to(k.dtype), k, PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, M, DO, STATS, DELTA, DQ, DMASK,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                        H, GROUP, Nq, Nk, causal_off, scale, NQ_BUCKET, NK_BUCKET,
                        D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DMASK: tl.constexpr,
                        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ (and dS) of BLOCK_M query rows of one (batch, query head), looping over key blocks
    of kv head h // GROUP."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Nq, BLOCK_M)
    bh = pid // num_m
    mb = num_m - 1 - pid % num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    m0 = mb * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    in_m = offs_m < Nq
    qmask = in_m[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m64[:, None] * sqm + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m64[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=in_m[:, None] & (offs_dv < DV)[None, :], other=0.0)
    m_row, log2_l = _load_stats(STATS, bh.to(tl.int64) * Nq, offs_m64, in_m)
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + offs_m, mask=in_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    msk_base = M + b * smb + h * smh
    dm_base = DMASK + bh.to(tl.int64) * Nq * Nk
    full_hi = (Nk // BLOCK_N) * BLOCK_N
    hi = Nk
    if IS_CAUSAL:
        full_hi, hi = _causal_fwd_range(m0, Nk, causal_off, BLOCK_M, BLOCK_N)
    dq = _dq_steps(dq, q, do, m_row, log2_l, delta, k_base, v_base, msk_base, dm_base, offs_m, offs_d, offs_dv,
                   0, full_hi, Nq, Nk, causal_off, skn, skd, svn, svd, smm, smn, scale,
                   D, DV, HAS_MASK, IS_CAUSAL, False, NEED_DMASK, PREC, BLOCK_N)
    dq = _dq_steps(dq, q, do, m_row, log2_l, delta, k_base, v_base, msk_base, dm_base, offs_m, offs_d, offs_dv,
                   full_hi, hi, Nq, Nk, causal_off, skn, skd, svn, svd, smm, smn, scale,
                   D, DV, HAS_MASK, IS_CAUSAL, True, NEED_DMASK, PREC, BLOCK_N)
    tl.store(DQ + bh.to(tl.int64) * Nq * D + offs_m64[:, None] * D + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qmask)



_attn_fwd_tuned = triton.autotune(
    _FWD_CONFIGS, key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _make_pruner(_smem_fwd, _regs_fwd, _fixed_fwd, "_attn_fwd_kernel")},
)(_attn_fwd_kernel)
_attn_bwd_dkv_tuned = triton.autotune(
    _DKV_CONFIGS, key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _make_pruner(_smem_dkv, _regs_dkv, _fixed_dkv, "_attn_bwd_dkv_kernel")},
)(_attn_bwd_dkv_kernel)
_attn_bwd_dq_tuned = triton.autotune(
    _DQ_CONFIGS, key=_TUNE_KEY + ["NEED_DMASK"],
    prune_configs_by={"early_config_prune": _make_pruner(_smem_dq, _regs_dq, _fixed_dq, "_attn_bwd_dq_kernel")},
)(_attn_bwd_dq_kernel)


# ------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------

def _launch(tuned, kernel, fixed: _Fixed, nblocks_of, args, meta) -> None:
    """Run ``kernel`` with the fixed tile (interpreter, deterministic mode) or the autotuned one.
    ``nblocks_of(block_m, block_n)`` is the number of programs."""
    if _use_fixed():
        kernel[(nblocks_of(fixed.block_m, fixed.block_n),)](
            *args, **meta, BLOCK_M=fixed.block_m, BLOCK_N=fixed.block_n,
            num_warps=fixed.num_warps, num_stages=fixed.num_stages)
    else:
        tuned[lambda META: (nblocks_of(META["BLOCK_M"], META["BLOCK_N"]),)](*args, **meta)


def _mask_args(mask: Optional[Tensor], q: Tensor):
    if mask is None:
        return q, (0, 0, 0, 0)
    return mask, tuple(mask.stride())


def _causal_offset(S: _Shape, lower_right: bool) -> int:
    """The diagonal of causal masking: key j is kept for query i iff j <= i + offset."""
    return S.Nk - S.Nq if lower_right else 0


def _meta(S: _Shape, q: Tensor, is_causal: bool, has_mask: bool) -> Dict:
    return dict(D=S.D, DV=S.Dv, BLOCK_D=_block_d(S.D), BLOCK_DV=_block_d(S.Dv),
                IS_CAUSAL=bool(is_causal), HAS_MASK=has_mask, PREC=_dot_precision(q.dtype))


# ------------------------------------------------------------------------------------------
# the public functions
# ------------------------------------------------------------------------------------------

def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                  scale: float, *, causal_lower_right: bool = False) -> Tuple[Tensor, Tensor]:
    """Flash-attention forward.

    q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] with H a multiple of Hkv (grouped-
    query attention: query head h reads kv head h // (H // Hkv); nothing is repeated), any
    strides (read in place). ``mask``: None or an additive float32 / q-dtype mask of shape
    [B, H, Nq, Nk], typically an ``expand`` view (stride 0 on broadcast dims); may hold -inf
    and huge finite fills such as ``finfo.min``. ``is_causal``: key j kept for query i iff
    j <= i (top-left diagonal), or iff j <= i + Nk - Nq with ``causal_lower_right`` (the
    diagonal aligned to the last key, as FlashAttention >= 2.1); not together with a mask.

    Returns ``(o, stats)``: o [B, H, Nq, Dv] contiguous in q's dtype and the softmax statistics
    [B, H, Nq, 2] float32: ``stats[..., 0]`` the row maximum m of the scores and
    ``stats[..., 1]`` the natural log of sum_j exp(S_ij - m), so lse = m + log-sum (see
    :func:`lse_of`). They are kept apart because a finite fill absorbs the log-sum: with
    every key of a row at -3.4e38 the lse rounds to m, while P = exp(S - m) / l needs both.
    Rows with every key masked by -inf give o = 0 and m = log-sum = -inf.
    """
    fn = "attention_fwd"
    S = _check_qkv(q, k, v, fn)
    _check_mask(mask, q, S, is_causal, fn)
    B, H, Nq, Nk, D, Dv = S
    o = torch.empty(B, H, Nq, Dv, dtype=q.dtype, device=q.device)
    stats = torch.empty(B, H, Nq, 2, dtype=torch.float32, device=q.device)
    if B * H * Nq == 0:
        return o, stats
    if Nk == 0:
        return o.zero_(), stats.fill_(float("-inf"))
    m, ms = _mask_args(mask, q)
    meta = _meta(S, q, is_causal, mask is not None)
    es = q.element_size()
    args = (q, k, v, m, o, stats, *q.stride(), *k.stride(), *v.stride(), *ms, *o.stride(),
            H, H // k.shape[1], Nq, Nk, _causal_offset(S, causal_lower_right), float(scale),
            _bucket(Nq), _bucket(Nk))
    with _device_guard(q):
        _launch(_attn_fwd_tuned, _attn_fwd_kernel, _fixed_fwd(meta["BLOCK_D"], meta["BLOCK_DV"], es),
                lambda bm, bn: B * H * triton.cdiv(Nq, bm), args, meta)
    return o, stats


def lse_of(stats: Tensor) -> Tensor:
    """The natural log-sum-exp [B, H, Nq] of each query row from :func:`attention_fwd`'s
    statistics (-inf for rows with every key masked by -inf)."""
    return stats[..., 0] + stats[..., 1]


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, stats: Tensor,
                  mask: Optional[Tensor], is_causal: bool, scale: float, need_dmask: bool, *,
                  causal_lower_right: bool = False) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Flash-attention backward from the forward's ``o`` and ``stats``.

    Takes the forward's arguments plus ``do`` (shape of o, q's dtype, any strides), ``o`` and
    ``stats`` as :func:`attention_fwd` returned them. Returns ``(dq, dk, dv, dmask)``:
    contiguous gradients with the shapes and dtypes of q, k, v (dk and dv of a kv head summed
    over the query heads of its group, in registers, without atomics), and, if ``need_dmask``,
    dS = P * (dP - delta), the gradient of an additive mask, as a contiguous float32
    [B, H, Nq, Nk] tensor (to be summed down to the mask's own shape by the caller); else
    None. Rows with every key masked by -inf contribute nothing to any gradient.
    """
    fn = "attention_bwd"
    S = _check_qkv(q, k, v, fn)
    _check_mask(mask, q, S, is_causal, fn)
    B, H, Nq, Nk, D, Dv = S
    Hkv = k.shape[1]
    _check_like(do, "do", (B, H, Nq, Dv), q.dtype, q.device, fn)
    _check_like(o, "o", (B, H, Nq, Dv), q.dtype, q.device, fn)
    _check_like(stats, "stats", (B, H, Nq, 2), torch.float32, q.device, fn)
    dq = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, Nk, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, Hkv, Nk, Dv, dtype=v.dtype, device=v.device)
    dmask = None
    if need_dmask:
        # Causal blocks above the diagonal are never visited: their zeros must be there already.
        alloc = torch.zeros if is_causal else torch.empty
        dmask = alloc(B, H, Nq, Nk, dtype=torch.float32, device=q.device)
    if B * H == 0 or (Nq == 0 and Nk == 0):
        return dq, dk, dv, dmask
    if Nq == 0 or Nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    stats = stats.contiguous()
    m, ms = _mask_args(mask, q)
    meta = _meta(S, q, is_causal, mask is not None)
    bd, bdv, es = meta["BLOCK_D"], meta["BLOCK_DV"], q.element_size()
    delta = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    common = (*q.stride(), *k.stride(), *v.stride(), *ms, *do.stride(),
              H, H // Hkv, Nq, Nk, _causal_offset(S, causal_lower_right), float(scale),
              _bucket(Nq), _bucket(Nk))
    with _device_guard(q):
        _bwd_delta_kernel[(B * H * triton.cdiv(Nq, _PRE_BLOCK_M),)](
            o, do, delta, H, Nq, *o.stride(), *do.stride(),
            DV=Dv, BLOCK_DV=bdv, BLOCK_M=_PRE_BLOCK_M)
        _launch(_attn_bwd_dkv_tuned, _attn_bwd_dkv_kernel, _fixed_dkv(bd, bdv, es),
                lambda bm, bn: B * Hkv * triton.cdiv(Nk, bn),
                (q, k, v, m, do, stats, delta, dk, dv, *common), meta)
        _launch(_attn_bwd_dq_tuned, _attn_bwd_dq_kernel, _fixed_dq(bd, bdv, es),
                lambda bm, bn: B * H * triton.cdiv(Nq, bm),
                (q, k, v, m, do, stats, delta, dq, dmask if dmask is not None else delta, *common),
                dict(meta, NEED_DMASK=bool(need_dmask)))
    return dq, dk, dv, dmask
