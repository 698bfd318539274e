"""What the conformance tests share: the backend fixture, inputs, and torch's MATH SDPA as the
reference (fused vs math, as PyTorch's own tests compare)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkern
from tests.backends import forced_backend_fixture

backend = forced_backend_fixture("cpu", "triton")


def randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype)


def math_sdpa(q, k, v, **kw):
    """torch's MATH backend (the reference of PyTorch's fused-kernel tests)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def run_with_grads(fn, tensors, dout, **kw):
    """fn(*tensors, **kw) and the gradients of every floating leaf (attn_mask included when it
    is a floating tensor in kw that requires grad)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    mask = kw.get("attn_mask")
    if isinstance(mask, torch.Tensor) and type(mask) is torch.Tensor and mask.is_floating_point():
        mask = mask.detach().clone().requires_grad_()
        kw = dict(kw, attn_mask=mask)
    else:
        mask = None
    out = fn(*leaves, **kw)
    if out.numel():
        out.backward(dout.to(out.dtype))
    grads = [t.grad for t in leaves] + ([mask.grad] if mask is not None else [])
    return out.detach(), grads


def up(t, dtype=torch.float64):
    return t.to(dtype) if isinstance(t, torch.Tensor) and type(t) is torch.Tensor and t.is_floating_point() else t


def ours(*a, **kw):
    return attnkern.scaled_dot_product_attention(*a, **kw)
