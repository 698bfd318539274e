"""attnkern.explain's attention maps held to FlashAttention's rule for attention probabilities
(its tests compare the kernel's P with ``max |P - P_ref| <= 2 x max |P_pt - P_ref|``): P of
every query row (attention_rows) and its mean over the queries (attention_received), against P
from the reference in float64 (P_ref) and computed as plain PyTorch does in the input dtype
(P_pt), on both backends; masks as the SDPA grids (none, causal, lower-right CausalBias,
key padding, finfo.min fills with fully masked rows). A seeded sample of the grid (_grid.py).
"""
from __future__ import annotations

import pytest
import torch

import attnkern
from attnkern.reference import attention as ref
from tests.conformance._common import backend, randn  # noqa: F401
from tests.conformance._grid import case_id, product, sample
from tests.tolerance import assert_flash_rule

GRID = product(dtype=[torch.float16, torch.bfloat16, torch.float32], d=[8, 16, 40, 64, 128, 256],
               seqlens=[(1, 17), (17, 1), (23, 40), (40, 23), (33, 33)],
               mask=["none", "is_causal", "lower_right", "keypad", "finfo_min_fill"])


def _mask(kind, L, S, dtype):
    """(attn_mask, is_causal, the same mask for the reference)."""
    if kind == "none":
        return None, False, None
    if kind == "is_causal":
        return None, True, ref.causal_mask(L, S)
    if kind == "lower_right":
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(L, S), False, ref.causal_mask(L, S, lower_right=True)
    if kind == "keypad":
        keep = torch.arange(S)[None, :] < torch.tensor([S, max(1, S // 3)])[:, None]
        keep = keep.view(2, 1, 1, S)
        return keep, False, keep
    m = torch.zeros(2, 1, L, S, dtype=dtype)
    m[..., S - max(1, S // 4):] = torch.finfo(dtype).min
    m[..., L // 2, :] = torch.finfo(dtype).min  # a fully masked row: uniform over its keys
    return m, False, m


@pytest.mark.parametrize("case", sample("flash_attn.attention_probabilities", GRID, 6), ids=case_id)
def test_attention_maps_flash_rule(backend, case):
    (L, S), d, dtype = case["seqlens"], case["d"], case["dtype"]
    q, k = randn((2, 3, L, d), dtype, 1, scale=1.5), randn((2, 3, S, d), dtype, 2, scale=1.5)
    mask, is_causal, dense = _mask(case["mask"], L, S, dtype)
    rows = attnkern.explain.attention_rows(q, k, list(range(L)), attn_mask=mask, is_causal=is_causal)
    received = attnkern.explain.attention_received(q, k, attn_mask=mask, is_causal=is_causal, block=16)
    p_ref, _ = ref.attention_probs(q.double(), k.double(), dense)
    p_pt, _ = ref.attention_probs(q, k, dense, upcast=False)
    # the maps are float32 whatever q's dtype: a softmax over S keys (and a mean over L rows)
    assert_flash_rule(rows, p_ref, p_pt, name="attention_rows", roundings=S)
    assert_flash_rule(received, p_ref.mean(dim=-2), p_pt.mean(dim=-2), name="attention_received",
                      roundings=L + S)
