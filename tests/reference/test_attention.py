"""The attention reference against ATen's math SDPA: the ground truth must itself be right."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkern.reference import attention as ref


def _qkv(B=2, H=3, Nq=5, Nk=7, D=8, Dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, Nk, Dv or D, generator=g, dtype=dtype)
    return q, k, v


def _aten(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


MASKS = {
    "none": lambda B, H, Nq, Nk, g: None,
    "bool-2d": lambda B, H, Nq, Nk, g: torch.rand(Nq, Nk, generator=g) > 0.3,
    "key-padding": lambda B, H, Nq, Nk, g: (torch.arange(Nk) < torch.tensor([Nk, 2])[:B, None]).view(B, 1, 1, Nk),
    "additive-4d": lambda B, H, Nq, Nk, g: torch.randn(B, H, Nq, Nk, generator=g, dtype=torch.float64),
    "additive-row": lambda B, H, Nq, Nk, g: torch.randn(1, Nk, generator=g, dtype=torch.float64),
}


@pytest.mark.parametrize("mask,causal", [(m, False) for m in MASKS] + [("none", True)],
                         ids=list(MASKS) + ["causal"])
def test_reference_equals_aten_math(mask, causal):
    q, k, v = _qkv(Dv=6)
    g = torch.Generator().manual_seed(1)
    m = MASKS[mask](2, 3, 5, 7, g)
    out, lse = ref.scaled_dot_product_attention(q, k, v, m, is_causal=causal, return_lse=True)
    expect = _aten(q, k, v, attn_mask=m, is_causal=causal)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    add = ref.additive_mask(m, causal, 5, 7, torch.float64)
    if add is not None:
        s = s + add
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_fully_masked_rows_give_zero_and_no_nan():
    q, k, v = _qkv(B=1, H=1, Nq=3, Nk=4)
    m = torch.ones(3, 4, dtype=torch.bool)
    m[1] = False
    q.requires_grad_(True)
    out, lse = ref.scaled_dot_product_attention(q, k, v, m, return_lse=True)
    assert torch.equal(out[0, 0, 1], torch.zeros_like(out[0, 0, 1]))
    assert torch.isneginf(lse[0, 0, 1]) and torch.isfinite(lse[0, 0, [0, 2]]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[0, 0, 1], torch.zeros_like(q.grad[0, 0, 1]))
    torch.testing.assert_close(out, _aten(q.detach(), k, v, attn_mask=m))


def test_causal_is_top_left_aligned_for_unequal_lengths():
    q, k, v = _qkv(Nq=3, Nk=6)
    p, _ = ref.attention_probs(q, k, is_causal=True)
    assert torch.equal(p[..., 0, 1:] == 0, torch.ones_like(p[..., 0, 1:], dtype=torch.bool))
    torch.testing.assert_close(ref.scaled_dot_product_attention(q, k, v, is_causal=True),
                               _aten(q, k, v, is_causal=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upcast_false_runs_in_the_input_dtype(dtype):
    q, k, v = (t.to(dtype) for t in _qkv(dtype=torch.float32))
    lo = ref.scaled_dot_product_attention(q, k, v, upcast=False)
    hi = ref.scaled_dot_product_attention(q, k, v)
    exact = ref.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert lo.dtype == hi.dtype == dtype
    # computing in the low dtype costs accuracy; the upcast reference is the better one
    assert (lo.double() - exact).abs().max() >= (hi.double() - exact).abs().max()
