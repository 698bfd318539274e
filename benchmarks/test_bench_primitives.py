"""The C++ gating primitives one by one (``torch.ops.attnkern.*`` on CPU tensors): GB/s moved
and the share of the bandwidth of a copy into an existing tensor of the same size, per
primitive, layout (NCHW, channels_last) and dtype (float32, bfloat16), at the block
benchmarks' shapes and at batch 1, for each vector ISA's copy of the kernels this CPU runs
(AVX2, AVX512, AVX512_BF16; ``ATTNKERN_BENCH_CAPABILITIES=AVX2`` measures a subset).

Bytes moved count the big tensors each primitive must read and write ([B, C] and [B, H*W]
statistics are negligible): channel_stats and spatial_stats read x once; gate_apply and
bam_combine read x and write out; gate_apply_residual_ reads x and the residual and writes x,
gate_apply_residual the same into a new tensor;
gate_apply_backward reads grad_out and x; spatial_stats_backward reads x; gating_input_grad
(CBAM's every term) reads x and grad_out and writes dx. The copy reads and writes once.

No timed call pays page faults for a fresh output: the x-sized outputs come from the kernels'
cache of freed blocks (csrc/output_cache.cpp), and for the small ones this suite sets glibc's
malloc to keep large blocks (``attnkern.slides.allocator``; the process keeps it, and pytest
collects this file after the other suites). Every timed call, the copy's too, starts
with its tensors out of the caches (a buffer twice the last-level cache is written first).
Medians of ``ROUNDS`` calls.

    pytest --benchmark benchmarks/test_bench_primitives.py
"""
from __future__ import annotations

import glob
import os
import time

import pytest
import torch

from attnkern import _cpu

SHAPES = [(8, 256, 56, 56), (32, 64, 112, 112), (16, 512, 28, 28), (1, 256, 56, 56)]
LAYOUTS = ("nchw", "channels_last")
DTYPES = (torch.float32, torch.bfloat16)
ROUNDS = 9
# primitive -> big-tensor transfers (reads + writes of x's size)
TRANSFERS = {"channel_stats": 1, "spatial_stats": 1, "gate_apply": 2, "gate_apply_residual_": 3,
             "gate_apply_residual": 3,
             "gate_apply_backward": 2, "spatial_stats_backward": 1, "gating_input_grad": 3, "bam_combine": 2}


@pytest.fixture(scope="module", autouse=True)
def _keep_large_blocks():
    from attnkern.slides.allocator import apply

    apply("auto")


def _last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (Linux sysfs; 32 MiB when it says nothing)."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=32 << 20)


# Written before every timed call, so that every call (the copy's included) starts with its
# tensors out of the caches: a CPU whose last-level cache holds a tensor (32 MB on some AMD
# EPYC) would otherwise time the copy and the primitives from cache, each as much as fits.
_EVICT = torch.empty(2 * _last_level_cache_bytes() // 4)


def _median(fn, rounds=ROUNDS):
    fn()
    ts = []
    for _ in range(rounds):
        _EVICT.fill_(1.0)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _calls(x):
    ops = torch.ops.attnkern
    B, C, H, W = x.shape
    g = torch.Generator().manual_seed(0)
    gc = torch.rand(B, C, generator=g)
    gs = torch.rand(B, H * W, generator=g)
    grad = torch.randn(x.shape, generator=g).to(x.dtype).contiguous(
        memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format)
    _, smax, scount = ops.spatial_stats(x, gc)
    _, cmax, ccount = ops.channel_stats(x)
    small = torch.randn(B, H * W, generator=g)
    chan = torch.randn(B, C, generator=g)
    target = x.clone()
    return {
        "channel_stats": lambda: ops.channel_stats(x),
        "spatial_stats": lambda: ops.spatial_stats(x, gc),
        "gate_apply": lambda: ops.gate_apply(x, gc, gs),
        "gate_apply_residual_": lambda: ops.gate_apply_residual_(target, gc, gs, grad, True),
        "gate_apply_residual": lambda: ops.gate_apply_residual(x, gc, None, grad, True),
        "gate_apply_backward": lambda: ops.gate_apply_backward(grad, x, gc, gs, True, True),
        "spatial_stats_backward": lambda: ops.spatial_stats_backward(x, gc, smax, scount, small, small),
        "gating_input_grad": lambda: ops.gating_input_grad(x, grad, gc, gs, smax, scount, small, small,
                                                           cmax, ccount, chan, chan),
        "bam_combine": lambda: ops.bam_combine(x, chan, small, False),
    }


def _capabilities():
    """The vector copies to measure: those this CPU runs (the baseline copy where it runs none)."""
    if _cpu.extension() is None:
        return ["DEFAULT"]
    caps = [c for c in _cpu.cpu_capabilities() if c != "DEFAULT"] or ["DEFAULT"]
    wanted = os.environ.get("ATTNKERN_BENCH_CAPABILITIES")
    return [c for c in caps if c in wanted.upper().split(",")] if wanted else caps


@pytest.fixture(params=_capabilities())
def capability(request):
    if _cpu.extension() is None:
        pytest.skip("the C++ extension is not built")
    before = _cpu.set_cpu_capability(request.param)
    yield request.param
    _cpu.set_cpu_capability(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_primitive_bandwidth(benchmark, recorder, capability, shape, layout, dtype):
    x = torch.randn(shape).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    copy_into = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    op = f"primitives {layout} {capability}"
    copy_s = _median(lambda: copy_into.copy_(x))
    copy_gbs = 2 * nbytes / copy_s / 1e9
    recorder.row(op, "copy", "copy", shape, dtype, "GB_per_s", copy_gbs)
    shares = {}

    def run_all():
        for name, fn in _calls(x).items():
            s = _median(fn)
            gbs = TRANSFERS[name] * nbytes / s / 1e9
            shares[name] = gbs / copy_gbs
            recorder.row(op, name, "fwd", shape, dtype, "GB_per_s", gbs)
            recorder.row(op, name, "fwd", shape, dtype, "share_of_copy", gbs / copy_gbs)

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    print(f"\n{op} {'x'.join(map(str, shape))} {dtype}: copy {copy_gbs:.1f} GB/s; "
          + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    assert all(v > 0 for v in shares.values())
