"""Our port of FlashAttention's tests/test_flash_attn.py (its triton-kernel grid: head dims
8..256 with odd ones, query/key length pairs, causal, MHA / MQA / GQA; shrunk to interpreter-
sized lengths), on both backends, with its rule: ``max |out - ref| <= 2 x max |out_pt - ref|``
and the same for dq, dk and dv (:func:`tests.tolerance.assert_flash_rule`), where ref is the
reference in float64 and out_pt the reference computed as plain PyTorch does in the input
dtype. ``causal`` is FlashAttention's (>= 2.1): the diagonal aligned to the last key, which
attnkern takes as ``torch.nn.attention.bias.causal_lower_right``; query rows that see no key
give 0, as in FlashAttention. Each test runs a seeded sample of the grid (_grid.py).
"""
from __future__ import annotations

import pytest
import torch

from attnkern.reference import attention as ref
from tests.conformance._common import backend, ours, randn, run_with_grads  # noqa: F401
from tests.conformance._grid import case_id, product, sample
from tests.tolerance import assert_flash_rule

F16, BF16 = torch.float16, torch.bfloat16
HEAD_DIMS = [8, 16, 32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256]
SEQLENS = [(1, 1), (1, 23), (23, 1), (13, 23), (23, 13), (33, 33), (17, 40), (40, 17)]
GRID = product(d=HEAD_DIMS, seqlens=SEQLENS, causal=[False, True], dtype=[F16, BF16],
               mha_type=["mha", "mqa", "gqa"])
NHEADS, NHEADS_K = 6, {"mha": 6, "mqa": 1, "gqa": 2}


@pytest.mark.parametrize("case", sample("flash_attn.output", GRID, 8), ids=case_id)
def test_flash_attn_output(backend, case):
    from torch.nn.attention.bias import causal_lower_right

    (L, S), d, dtype = case["seqlens"], case["d"], case["dtype"]
    hk = NHEADS_K[case["mha_type"]]
    q = randn((2, NHEADS, L, d), dtype, 1)
    k, v = randn((2, hk, S, d), dtype, 2), randn((2, hk, S, d), dtype, 3)
    dout = randn((2, NHEADS, L, d), dtype, 4)
    causal = case["causal"]
    gqa = hk != NHEADS
    out, grads = run_with_grads(ours, (q, k, v), dout, enable_gqa=gqa,
                                attn_mask=causal_lower_right(L, S) if causal else None)
    dense = ref.causal_mask(L, S, lower_right=True) if causal else None

    def reference(dt, upcast):
        return run_with_grads(lambda *a, **kw: ref.scaled_dot_product_attention(*a, upcast=upcast, **kw),
                              [t.to(dt) for t in (q, k, v)], dout.to(dt), attn_mask=dense, enable_gqa=gqa)

    r_out, r_grads = reference(torch.float64, True)
    p_out, p_grads = reference(dtype, False)
    assert torch.isfinite(out).all()
    assert_flash_rule(out, r_out, p_out, name="out")
    for name, a, r, p in zip(["dq", "dk", "dv"], grads, r_grads, p_grads):
        assert a.shape == r.shape, name
        assert_flash_rule(a, r, p, name=name)
