"""What the Triton kernels of the gating primitives share: the dtypes they take, the tiling
constants and plans (shape-only, hence reproducible), the argument checks, the (max, count)
merge, program-id coordinates, and the kernel that combines per-split partials in order.

Design (for bandwidth on H100/H200-class GPUs; checked on CPU under ``TRITON_INTERPRET=1``):

- **Layouts without copies.** x is read as ``[B, C, HW]`` through its strides, so NCHW- and
  channels_last-contiguous tensors are both taken as they are. A program works on
  ``[BLOCK_C, BLOCK_HW]`` tiles shaped by the layout: long along HW for NCHW, long along C for
  channels_last, so every load is coalesced along the contiguous dimension.
- **Accumulation dtype.** float64 for float64 input, float32 otherwise: x is loaded, upcast,
  and everything after that (gates, products, sums, maxima) is in that dtype. Gates,
  statistics and their gradients are contiguous tensors of the accumulation dtype, counts int32.
  Inputs taken: ``SUPPORTED_DTYPES`` (float32, bfloat16, float16, float64).
- **Reductions without atomics.** A reduction over C runs inside one program (C is at most a
  few thousand). A reduction over H*W, which may span a 112x112 or larger map, is split in
  fixed ranges of pixel tiles: each program writes its partial result and a second small kernel
  combines the partials in a fixed order. Tile sizes and split counts depend on the shapes only
  (not on timing: no autotuning, whose choice of tiles would change the summation order from one
  process to the next), so two runs give bitwise-equal results.
- **Max with tie count** follows ``torch.amax``'s gradient: per row the max and the number of
  elements equal to it; (max, count) pairs of tiles and of splits merge exactly. A NaN in a
  reduced row makes its max NaN (as ``torch.amax``). The max masks of the backward passes
  recompute ``x*gc`` exactly as ``spatial_stats`` does, so they select the same elements.
- **64-bit offsets**: batch, channel and pixel indices are widened to int64 before they meet a
  stride, so tensors over 2^31 elements are addressed correctly. Ragged edges (any C, H, W) are
  masked. Grids are one-dimensional (no 65535 limit on the second and third grid axes).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import interpret as _interpret

#: Input dtypes the kernels take (x and grad_out); the ops layer sends any other to the reference.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Tiling. A tile holds about _TILE elements. NCHW tiles run up to _MAX_BLOCK_HW pixels along a
# row; channels_last tiles up to _MAX_BLOCK_C channels. Kernels that loop over C shrink their
# pixel block (not below _MIN_BLOCK_HW for NCHW, 64 bytes of a float32 row: whole 32-byte
# sectors, nor below _MIN_PROGRAM_ELEMS elements of work per program) until there are about
# _TARGET_PROGRAMS programs, enough to fill the 132 SMs of an H100 several times. On an H200
# (benchmarks/gpu_tile_sweep.py) a floor of 16 pixels instead of 128 made NCHW spatial_stats
# 2.8-4.2x faster at 8x256x56x56 and 16x512x28x28 (tiles 128x32 and 256x16 in place of 32x128:
# more programs, fewer loop steps) and the C-looping backward 1.4-2.2x; a floor of 32 gave
# 128x32 at 16x512x28x28 too (30 against 22 µs), 64 less at both. Reductions over H*W are split
# into ranges of at least _MIN_TILES_PER_SPLIT tiles with the same target. A float64 tile holds
# half as many elements (each takes two registers): at 4096, 32x128 channels_last tiles of the
# statistics kernels spilled registers on sm_80 and sm_90 (ptxas, 4-24 B a thread); and its
# C-looping NCHW tiles keep the floor of 128 pixels (_MIN_BLOCK_HW_F64): at 16, the 128x16 tile
# of spatial_stats spilled 8 B on sm_90 (ptxas 12.9).
_TILE = 4096
_MAX_BLOCK_HW = 1024
_MIN_BLOCK_HW = 16
_MIN_BLOCK_HW_F64 = 128
_MAX_BLOCK_C = 128
_MIN_BLOCK_HW_CL = 4
_TARGET_PROGRAMS = 1024
_MIN_PROGRAM_ELEMS = 4096
_MIN_TILES_PER_SPLIT = 4
# gate_apply_backward / bam_combine_backward loop over pixels (writing one partial of the
# channel sum per channel block) when a tile spans at least this many channels, else over C.
_MIN_BLOCK_C_FOR_HW_LOOP = 32
_MAX_BLOCK_COMBINE = 1024


class _Layout(NamedTuple):
    """x seen as [B, C, HW]: sizes, element strides and whether it is channels_last."""

    B: int
    C: int
    HW: int
    cl: bool
    sB: int
    sC: int
    sHW: int
    acc: torch.dtype


def _err(fn: str, msg: str) -> str:
    return f"attnkern.triton.gating.{fn}: {msg}"


def _check_x(x: Tensor, fn: str) -> _Layout:
    if not isinstance(x, Tensor):
        raise TypeError(_err(fn, f"x must be a torch.Tensor, got {type(x).__name__}"))
    if x.dim() != 4:
        raise ValueError(_err(fn, f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}"))
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(_err(fn, f"x must have dtype {names}; got {x.dtype}"))
    if x.numel() == 0:
        raise ValueError(_err(fn, f"x must not be empty, got shape {tuple(x.shape)}"))
    if not x.is_cuda and not (x.device.type == "cpu" and _interpret()):
        raise ValueError(_err(fn, f"x must be a CUDA tensor (CPU tensors only under "
                                  f"TRITON_INTERPRET=1), got device {x.device}"))
    if x.is_contiguous():
        cl = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        cl = True
    else:
        raise ValueError(_err(fn, f"x must be NCHW-contiguous or channels_last-contiguous, got "
                                  f"shape {tuple(x.shape)} with strides {x.stride()}"))
    B, C, H, W = x.shape
    if C >= 2**31 or H * W >= 2**31:
        raise ValueError(_err(fn, f"C and H*W must each be below 2**31, got shape {tuple(x.shape)}"))
    # H and W flatten into one pixel index in both layouts. The stride of a size-1 dimension is
    # arbitrary (contiguity ignores it), so the pixel stride is W's unless W == 1.
    s_hw = x.stride(3) if W > 1 else x.stride(2)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _Layout(B, C, H * W, cl, x.stride(0), x.stride(1), s_hw, acc)


def _check_big(t: Tensor, name: str, x: Tensor, L: _Layout, fn: str) -> None:
    """A second big tensor (grad_out): x's shape, dtype, device and memory format."""
    if not isinstance(t, Tensor):
        raise TypeError(_err(fn, f"{name} must be a torch.Tensor, got {type(t).__name__}"))
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(_err(fn, f"{name} must have x's shape {tuple(x.shape)}, dtype {x.dtype} and "
                                  f"device {x.device}; got {tuple(t.shape)}, {t.dtype}, {t.device}"))
    fmt = torch.channels_last if L.cl else torch.contiguous_format
    if not t.is_contiguous(memory_format=fmt):
        layout = "channels_last" if L.cl else "NCHW"
        raise ValueError(_err(fn, f"{name} must be {layout}-contiguous like x, got strides {t.stride()}"))


def _check_small(t: Optional[Tensor], name: str, n: int, x: Tensor, fn: str,
                 dtype: torch.dtype) -> None:
    """A gate, statistic or gradient: ``n`` contiguous elements of ``dtype`` on x's device."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(_err(fn, f"{name} must be a torch.Tensor or None, got {type(t).__name__}"))
    if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device != x.device:
        raise ValueError(_err(fn, f"{name} must be a contiguous {dtype} tensor of {n} elements on "
                                  f"{x.device}; got {t.dtype}, shape {tuple(t.shape)}, "
                                  f"contiguous={t.is_contiguous()}, device {t.device}"))


def _tl_acc(L: _Layout):
    return tl.float64 if L.acc == torch.float64 else tl.float32


def _placeholder(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A one-element tensor passed for an absent optional argument (never read)."""
    return torch.empty(1, dtype=dtype, device=x.device)


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _num_warps(block_c: int, block_hw: int) -> int:
    return 8 if block_c * block_hw >= 4096 else 4


def _tile_elems(L: _Layout) -> int:
    """Elements per tile: _TILE, half of it for float64."""
    return _TILE // 2 if L.acc == torch.float64 else _TILE


def _stream_tile(L: _Layout) -> Tuple[int, int]:
    """The tile of element-wise kernels and of kernels that loop over pixels."""
    tile = _tile_elems(L)
    if L.cl:
        bc = min(_np2(L.C), _MAX_BLOCK_C)
        bhw = min(_np2(L.HW), max(1, tile // bc))
    else:
        bhw = min(_np2(L.HW), _MAX_BLOCK_HW)
        bc = min(_np2(L.C), max(1, tile // bhw))
    return bc, bhw


def _c_loop_tile(L: _Layout) -> Tuple[int, int]:
    """The tile of kernels with one program per (batch, pixel block) looping over C: the pixel
    block shrinks until B * HW / BLOCK_HW reaches about _TARGET_PROGRAMS, but a program keeps
    at least about _MIN_PROGRAM_ELEMS elements of work (C * BLOCK_HW)."""
    want = max(_np2(triton.cdiv(L.B * L.HW, _TARGET_PROGRAMS)), _np2(triton.cdiv(_MIN_PROGRAM_ELEMS, L.C)))
    tile = _tile_elems(L)
    if L.cl:
        bc = min(_np2(L.C), _MAX_BLOCK_C)
        bhw = min(_np2(L.HW), max(1, tile // bc), max(want, _MIN_BLOCK_HW_CL))
    else:
        floor = _MIN_BLOCK_HW_F64 if L.acc == torch.float64 else _MIN_BLOCK_HW
        bhw = min(_np2(L.HW), _MAX_BLOCK_HW, max(want, floor))
        bc = min(_np2(L.C), max(1, tile // bhw))
    return bc, bhw


class _SplitPlan(NamedTuple):
    """A reduction over pixels: tiles of [block_c, block_hw], ``ncb`` channel blocks, the pixel
    tiles cut into ``nsplit`` ranges of ``tps`` tiles, one program per (b, channel block, range)."""

    block_c: int
    block_hw: int
    ncb: int
    nsplit: int
    tps: int

    @property
    def grid(self):
        return self.ncb * self.nsplit


def _split_plan(L: _Layout) -> _SplitPlan:
    bc, bhw = _stream_tile(L)
    ncb = triton.cdiv(L.C, bc)
    ntiles = triton.cdiv(L.HW, bhw)
    nsplit = max(1, min(triton.cdiv(_TARGET_PROGRAMS, L.B * ncb), triton.cdiv(ntiles, _MIN_TILES_PER_SPLIT)))
    tps = triton.cdiv(ntiles, nsplit)
    nsplit = triton.cdiv(ntiles, tps)  # no empty range
    return _SplitPlan(bc, bhw, ncb, nsplit, tps)


@triton.jit
def _merge_max_count(m, n, tm, tn):
    """Merge running (max, count) pairs with a tile's pairs, elementwise; exact."""
    new = tl.maximum(m, tm)
    n = tl.where(m == new, n, 0) + tl.where(tm == new, tn, 0)
    return new, n


@triton.jit
def _split_coords(NCB, NSPLIT):
    """Program id -> (batch, channel block, pixel range); ranges of one row are adjacent."""
    pid = tl.program_id(0)
    s = pid % NSPLIT
    t = pid // NSPLIT
    return (t // NCB).to(tl.int64), t % NCB, s


@triton.jit
def _tile_coords(NCB, NHB, CL: tl.constexpr):
    """Program id -> (batch, channel block, pixel block), walking the contiguous axis first."""
    pid = tl.program_id(0)
    if CL:
        cb = pid % NCB
        t = pid // NCB
        hb = t % NHB
        b = t // NHB
    else:
        hb = pid % NHB
        t = pid // NHB
        cb = t % NCB
        b = t // NCB
    return b.to(tl.int64), cb, hb


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, N, NSPLIT, BLOCK: tl.constexpr):
    """out[b, n] = sum over s, in order, of part[b, s, n]."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(N, BLOCK)
    b = (pid // nblk).to(tl.int64)
    offs = (pid % nblk) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for s in range(0, NSPLIT):
        acc += tl.load(part_ptr + (b * NSPLIT + s) * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + b * N + offs, acc, mask=mask)


def _combine_sums(part: Tensor, B: int, N: int) -> Tensor:
    """[B, S, N] partials -> [B, N] sums in split order (a view when S == 1)."""
    nsplit = part.shape[1]
    if nsplit == 1:
        return part.view(B, N)
    out = torch.empty(B, N, dtype=part.dtype, device=part.device)
    block = min(_np2(N), _MAX_BLOCK_COMBINE)
    _sum_splits_kernel[(B * triton.cdiv(N, block),)](part, out, N, nsplit, BLOCK=block)
    return out


def _launch_elementwise(kernel, L: _Layout, *args, **meta) -> None:
    bc, bhw = _stream_tile(L)
    ncb, nhb = triton.cdiv(L.C, bc), triton.cdiv(L.HW, bhw)
    kernel[(L.B * ncb * nhb,)](*args, L.C, L.HW, L.sB, L.sC, L.sHW, ncb, nhb, **meta, CL=L.cl,
                                ACC=_tl_acc(L), BLOCK_C=bc, BLOCK_HW=bhw,
                                num_warps=_num_warps(bc, bhw))

