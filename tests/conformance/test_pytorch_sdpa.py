"""Our port of PyTorch's test/test_transformers.py fused-vs-math SDPA tests (our code; their
parameter grids and tolerance rule, shrunk to interpreter-sized shapes), on both backends.

Rule (:func:`tests.tolerance.torch_sdpa_tolerances`): the result is compared with the float64
MATH result, with an absolute and a relative tolerance of the same-dtype MATH result's own
largest deviation from it (at least the dtype's floor), times a fudge factor per output:
flash-style out 1 (3 for head dims not a multiple of 8), dq 4, dk 2, dv 2; with masks (the
memory-efficient tests) out 3, dq 4, dk 2, dv 2 and the mask's gradient 8.

Grids: flash-style (no mask: batch, L x S, head dims 8..256 with odd ones, causal, dtype,
scale, grouped-query heads), memory-efficient-style (additive masks with gradients, boolean
masks, the broadcast shapes of the mask), packed and strided inputs, L or S of 0 and 1, and the
causal variants (is_causal, CausalBias upper-left and lower-right). Each test runs a seeded
sample of its grid (tests/conformance/_grid.py). Dropout is not ported: with dropout_p > 0
attnkern hands the call to ATen's SDPA on every backend.
"""
from __future__ import annotations

import pytest
import torch

from tests.conformance._common import backend, math_sdpa, ours, randn, run_with_grads, up  # noqa: F401
from tests.conformance._grid import case_id, product, sample
from tests.tolerance import assert_close_torch_sdpa

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
SEQ = [1, 4, 17, 33]


def _check(q, k, v, dtype, fudge, seed=0, **kw):
    """Ours and the MATH references (float64, same dtype) on q, k, v (+ kw), forward and the
    gradients of every input, under PyTorch's rule with ``fudge`` = {name: factor}."""
    shape = ours(q, k, v, **kw).shape
    dout = randn(shape, dtype, seed + 99)
    out, grads = run_with_grads(ours, (q, k, v), dout, **kw)
    hi_kw = {n: up(t) for n, t in kw.items()}
    h_out, h_grads = run_with_grads(math_sdpa, [up(t) for t in (q, k, v)], up(dout), **hi_kw)
    s_out, s_grads = run_with_grads(math_sdpa, (q, k, v), dout, **kw)
    assert out.shape == h_out.shape and out.dtype == dtype
    assert_close_torch_sdpa(out, h_out, s_out, fudge["out"], "out")
    for name, a, h, s in zip(["dq", "dk", "dv", "dmask"], grads, h_grads, s_grads):
        assert a is not None and a.shape == h.shape, name
        assert_close_torch_sdpa(a, h, s.to(a.dtype), fudge[name], name, dtype=dtype)


FLASH_FUDGE = dict(out=1.0, dq=4.0, dk=2.0, dv=2.0)
MASK_FUDGE = dict(out=3.0, dq=4.0, dk=2.0, dv=2.0, dmask=8.0)

FLASH_GRID = product(B=[1, 2], L=SEQ, S=SEQ, E=[8, 16, 21, 32, 64, 72, 96, 128, 160, 192, 203, 256],
                     causal=[False, True], dtype=[F16, BF16, F32], scale=[None, "l1"], gqa=[False, True])


@pytest.mark.parametrize("case", sample("pytorch.flash_vs_math", FLASH_GRID, 8), ids=case_id)
def test_flash_attention_vs_math_ref_grads(backend, case):
    B, L, S, E, dtype = case["B"], case["L"], case["S"], case["E"], case["dtype"]
    hq, hk = (4, 2) if case["gqa"] else (3, 3)
    q = randn((B, hq, L, E), dtype, 1)
    k, v = randn((B, hk, S, E), dtype, 2), randn((B, hk, S, E), dtype, 3)
    fudge = dict(FLASH_FUDGE, out=3.0 if E % 8 else 1.0)
    _check(q, k, v, dtype, fudge, is_causal=case["causal"], scale=1.0 / E if case["scale"] else None,
           enable_gqa=case["gqa"])


MASK_GRID = product(B=[1, 2], L=SEQ, S=SEQ, E=[8, 16, 32, 64, 72, 128, 256], dtype=[F16, BF16, F32],
                    mask=["additive_full", "additive_grad_bcast", "bool", "bool_keypad"])


def _mask(kind, B, H, L, S, dtype, seed=7):
    if kind == "additive_full":       # [B, H, L, S] float, gradient wanted
        return randn((B, H, L, S), dtype, seed)
    if kind == "additive_grad_bcast":  # [1, H, 1, S] float32 bias, gradient summed down
        return randn((1, H, 1, S), F32, seed)
    if kind == "bool":
        m = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(seed)) > 0.3
        m[..., 0] = True
        return m
    keep = torch.arange(S)[None, :] < torch.tensor([S, max(1, S // 2)][:B])[:, None]
    return keep.view(B, 1, 1, S)


@pytest.mark.parametrize("case", sample("pytorch.mem_efficient_with_mask", MASK_GRID, 6), ids=case_id)
def test_mem_efficient_attention_with_mask_vs_math_ref_grads(backend, case):
    B, L, S, E, dtype = case["B"], case["L"], case["S"], case["E"], case["dtype"]
    q, k, v = randn((B, 2, L, E), dtype, 4), randn((B, 2, S, E), dtype, 5), randn((B, 2, S, E), dtype, 6)
    _check(q, k, v, dtype, MASK_FUDGE, attn_mask=_mask(case["mask"], B, 2, L, S, dtype))


MASK_SHAPES = [(9, 17), (1, 9, 17), (2, 1, 9, 17), (1, 3, 9, 17), (2, 3, 1, 17), (2, 1, 1, 17),
               (1, 1, 9, 1), (3, 9, 17)]
BCAST_GRID = product(shape=MASK_SHAPES, kind=["bool", "float"], dtype=[F16, F32])


@pytest.mark.parametrize("case", sample("pytorch.mask_broadcast_shapes", BCAST_GRID, 6), ids=case_id)
def test_mask_broadcast_shapes(backend, case):
    dtype = case["dtype"]
    q, k, v = randn((2, 3, 9, 16), dtype, 8), randn((2, 3, 17, 16), dtype, 9), randn((2, 3, 17, 16), dtype, 10)
    if case["kind"] == "bool":
        m = torch.rand(case["shape"], generator=torch.Generator().manual_seed(11)) > 0.4
        m[..., 0] = True
    else:
        m = randn(case["shape"], dtype, 11)
    _check(q, k, v, dtype, MASK_FUDGE, attn_mask=m)


LAYOUT_GRID = product(layout=["packed_qkv", "transposed", "sliced_last_dim"], dtype=[F16, BF16, F32],
                      causal=[False, True], E=[16, 40])


def _layout(layout, B, H, N, E, dtype, seed=12):
    if layout == "packed_qkv":  # views of one projection, as a ViT cuts them
        qkv = randn((B, N, 3 * H * E), dtype, seed).view(B, N, 3, H, E).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)
    if layout == "transposed":  # [B, N, H, E] memory read as [B, H, N, E]
        return [randn((B, N, H, E), dtype, seed + i).transpose(1, 2) for i in range(3)]
    return [randn((B, H, N, 2 * E), dtype, seed + i)[..., ::2] for i in range(3)]  # last stride 2


@pytest.mark.parametrize("case", sample("pytorch.packed_and_strided", LAYOUT_GRID, 4), ids=case_id)
def test_packed_and_strided_inputs(backend, case):
    dtype = case["dtype"]
    q, k, v = _layout(case["layout"], 2, 3, 17, case["E"], dtype)
    assert not q.is_contiguous()
    _check(q, k, v, dtype, FLASH_FUDGE, is_causal=case["causal"])


EDGE_GRID = product(L=[0, 1, 5], S=[0, 1, 5], B=[0, 1], dtype=[F16, F32])


@pytest.mark.parametrize("case", sample("pytorch.seq_len_1_and_empty", EDGE_GRID, 6), ids=case_id)
def test_seq_len_one_and_empty(backend, case):
    """L or S of 0 and 1 and an empty batch: shapes and values as torch's math (S = 0 gives 0)."""
    B, L, S, dtype = case["B"], case["L"], case["S"], case["dtype"]
    q, k, v = randn((B, 2, L, 8), dtype, 13), randn((B, 2, S, 8), dtype, 14), randn((B, 2, S, 8), dtype, 15)
    out = ours(q, k, v)
    ref = math_sdpa(q.double(), k.double(), v.double())
    assert out.shape == ref.shape and out.dtype == dtype and torch.isfinite(out).all()
    if out.numel():
        _check(q, k, v, dtype, FLASH_FUDGE)


CAUSAL_GRID = [c for c in product(variant=["is_causal", "upper_left", "lower_right"], L=[1, 4, 17, 33],
                                  S=[1, 4, 17, 33], dtype=[F16, BF16, F32])
               if not (c["variant"] == "lower_right" and c["L"] > c["S"])]  # rows without keys: NaN in torch


@pytest.mark.parametrize("case", sample("pytorch.causal_variants", CAUSAL_GRID, 6), ids=case_id)
def test_causal_variants(backend, case):
    """is_causal and torch.nn.attention.bias.CausalBias (upper-left, lower-right) against MATH
    with the bias materialised (CausalBias is never read as a tensor by attnkern)."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    L, S, dtype = case["L"], case["S"], case["dtype"]
    q, k, v = randn((2, 2, L, 16), dtype, 16), randn((2, 2, S, 16), dtype, 17), randn((2, 2, S, 16), dtype, 18)
    if case["variant"] == "is_causal":
        _check(q, k, v, dtype, FLASH_FUDGE, is_causal=True)
        return
    bias = (causal_upper_left if case["variant"] == "upper_left" else causal_lower_right)(L, S)
    dense = torch.ones(L, S, dtype=torch.bool).tril(S - L if case["variant"] == "lower_right" else 0)
    dout = randn((2, 2, L, 16), dtype, 19)
    out, grads = run_with_grads(ours, (q, k, v), dout, attn_mask=bias)
    h_out, h_grads = run_with_grads(math_sdpa, [up(t) for t in (q, k, v)], up(dout), attn_mask=dense)
    s_out, s_grads = run_with_grads(math_sdpa, (q, k, v), dout, attn_mask=dense)
    assert_close_torch_sdpa(out, h_out, s_out, FLASH_FUDGE["out"], "out")
    for name, a, h, s in zip(["dq", "dk", "dv"], grads, h_grads, s_grads):
        assert_close_torch_sdpa(a, h, s, FLASH_FUDGE[name], name)
