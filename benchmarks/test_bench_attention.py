"""Scaled dot-product attention: attnkern vs naive (the reference, which materialises the
N x N scores) vs ATen's SDPA vs torch.compile of the naive code, side by side in one run, at
ViT-S sizes (6 heads, head dim 64) for N in {197, 1024, 4096}: forward and forward+backward,
and memory — bytes saved for backward (exact on any machine) and, on a GPU, the peak allocated.

``pytest --benchmark benchmarks/test_bench_attention.py``; ``python benchmarks/report.py``.
On the CPU attnkern runs ATen's own fused SDPA (it does not rewrite it), so "attnkern" and
"aten" should agree there; on a GPU attnkern runs its Triton flash kernels, and the rows carry
TFLOP/s (4 * B * H * N^2 * D forward, 2.5x that for forward+backward, as FlashAttention counts).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern.compare import saved_bytes as count_saved
from attnkern.reference import attention as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
B, H, D = (8, 6, 64) if DEVICE == "cuda" else (1, 6, 64)
NS = [197, 1024, 4096]
VARIANTS = ["naive", "attnkern", "aten", "compile"]

_compiled = {}


class _Call(torch.nn.Module):
    """fn(q, k, v) as a module of q (what attnkern.compare.saved_bytes takes)."""

    def __init__(self, fn, k, v):
        super().__init__()
        self.fn, self.k, self.v = fn, k, v

    def forward(self, q):
        return self.fn(q, self.k, self.v)


def _fn(variant):
    if variant == "naive":
        return ref.scaled_dot_product_attention
    if variant == "attnkern":
        return attnkern.scaled_dot_product_attention
    if variant == "aten":
        return F.scaled_dot_product_attention
    if variant == "compile":
        if "c" not in _compiled:
            _compiled["c"] = torch.compile(ref.scaled_dot_product_attention, dynamic=False)
        return _compiled["c"]
    raise ValueError(variant)


def _inputs(n, grad):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(B, n, 3, H, D, generator=g, device=DEVICE, dtype=DTYPE)
    q, k, v = (t.detach().requires_grad_(grad) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    return q, k, v


def _flops(n, pass_):
    f = 4.0 * B * H * n * n * D
    return f if pass_ == "fwd" else 3.5 * f


def _record_speed(recorder, variant, pass_, shape, med, n):
    if DEVICE == "cuda":
        recorder.row("sdpa", variant, pass_, shape, DTYPE, "TFLOP_per_s", _flops(n, pass_) / med / 1e12,
                     device=DEVICE)


def _peak(recorder, variant, pass_, shape, fn):
    if DEVICE != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    recorder.row("sdpa", variant, pass_, shape, DTYPE, "peak_MB",
                 (torch.cuda.max_memory_allocated() - base) / 2**20, device=DEVICE)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", NS)
def test_sdpa_forward(benchmark, recorder, n, variant):
    q, k, v = _inputs(n, grad=False)
    fn = _fn(variant)
    shape = (B, H, n, D)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    for _ in range(2 if variant == "compile" else 1):
        fwd()
    rounds = 3 if n == 4096 else 7
    med = recorder.time(benchmark, fwd, op="sdpa", variant=variant, pass_="fwd", shape=shape, dtype=DTYPE,
                        rounds=rounds, warmup=1, device=DEVICE)
    _record_speed(recorder, variant, "fwd", shape, med, n)
    _peak(recorder, variant, "fwd", shape, fwd)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", NS)
def test_sdpa_forward_backward(benchmark, recorder, n, variant):
    q, k, v = _inputs(n, grad=True)
    fn = _fn(variant)
    shape = (B, H, n, D)
    dout = torch.randn_like(q)

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)

    for _ in range(2 if variant == "compile" else 1):
        step()
    rounds = 3 if n == 4096 else 7
    med = recorder.time(benchmark, step, op="sdpa", variant=variant, pass_="fwd+bwd", shape=shape, dtype=DTYPE,
                        rounds=rounds, warmup=1, device=DEVICE)
    _record_speed(recorder, variant, "fwd+bwd", shape, med, n)
    _peak(recorder, variant, "fwd+bwd", shape, step)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "compile"])
@pytest.mark.parametrize("n", NS)
def test_sdpa_saved_for_backward(recorder, n, variant):
    """Bytes autograd keeps between forward and backward, over the bytes of q, k and v."""
    q, k, v = _inputs(n, grad=True)
    fn = _fn(variant)
    qkv_bytes = 3 * q.numel() * q.element_size()
    saved = count_saved(_Call(fn, k, v), q)
    recorder.row("sdpa", variant, "saved", (B, H, n, D), DTYPE, "saved_over_qkv", saved / qkv_bytes,
                 device=DEVICE)
