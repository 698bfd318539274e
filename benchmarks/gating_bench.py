"""What the CBAM, SE and BAM benchmark suite shares: the shapes, layouts and passes, the
interleaved timing of every variant of one case, the memory floor and the saved-for-backward
count. Every case compares, side by side in one run: ``fused`` (attnkern), ``naive`` (the
reference), ``timm`` (the eager module users have today; for BAM the reference is that module)
and ``compile`` (``torch.compile`` of that module).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Dict

import pytest
import torch

from attnkern.compare import FLOOR_TRANSFERS, VARIANTS, make_variant

# The README's three shapes, then two of a 256-px pathology tile model: ResNet stage 1
# (16 tiles, 64x64 maps) and stage 3 at batch 1 (channel-heavy, one tile at a time).
README_SHAPES = [(8, 256, 56, 56), (32, 64, 112, 112), (16, 512, 28, 28)]
SHAPES = README_SHAPES + [(16, 256, 64, 64), (1, 1024, 16, 16)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
LAYOUTS = ("nchw", "channels_last")

# pass -> (module train mode, grad mode of the forward, backward too). CBAM is timed in every
# forward mode (timm's spatial gate has a BatchNorm, so train and eval differ); SE and BAM in
# eval/no_grad and in a training step.
PASSES = {
    "fwd eval no_grad": (False, torch.no_grad, False),
    "fwd eval inference_mode": (False, torch.inference_mode, False),
    "fwd train no_grad": (True, torch.no_grad, False),
    "fwd train inference_mode": (True, torch.inference_mode, False),
    "fwd+bwd train": (True, contextlib.nullcontext, True),
}
PASSES_OF = {
    "cbam": tuple(PASSES),
    "se": ("fwd eval no_grad", "fwd+bwd train"),
    "bam": ("fwd eval no_grad", "fwd+bwd train"),
}
ROUNDS = int(os.environ.get("ATTNKERN_BENCH_ROUNDS", "7"))


def _input(shape, layout: str) -> torch.Tensor:
    x = torch.randn(shape)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _step(model: Callable, pass_: str, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    _, grad_mode, backward = PASSES[pass_]
    if not backward:
        def fwd():
            with grad_mode():
                model(x)
        return fwd
    xg = x.detach().clone().requires_grad_()  # keeps x's layout

    def fwd_bwd():
        xg.grad = None
        model(xg).backward(g)
    return fwd_bwd


def block_case(benchmark, recorder, op: str, shape, layout: str, pass_: str) -> Dict[str, float]:
    """Time every variant of ``op`` and a copy of x into an existing tensor, interleaved: round
    r runs each once, in an order that rotates every round, so machine noise falls on all alike.
    Records each variant's median (ms) and the memory floor of the pass (the copy's time per
    transfer times the pass's reads + writes of x's size, ``FLOOR_TRANSFERS``); returns the
    medians in seconds."""
    train = PASSES[pass_][0]
    if op == "bam" and train and PASSES[pass_][2] and shape[0] == 1:
        pytest.skip("BAM's channel branch has a BatchNorm1d over [B, C/r]: training needs B > 1")
    # Each case compiles its own module: without a reset, dynamo's per-code cache of
    # timm's forward fills up (recompile_limit) over the cases and `compile` silently runs eager.
    torch._dynamo.reset()
    x, g = _input(shape, layout), _input(shape, layout)
    y = torch.empty_like(x)
    steps: Dict[str, Callable[[], None]] = {"copy": lambda: y.copy_(x)}
    for v in VARIANTS[op]:
        steps[v] = _step(make_variant(op, v, shape[1], train=train), pass_, x, g)
        steps[v]()  # torch.compile compiles here, outside the timed rounds
        steps[v]()  # allocator and caches warm
    times: Dict[str, list] = {v: [] for v in steps}
    order = list(steps)

    def one_round():
        for v in order:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
        order.append(order.pop(0))

    benchmark.extra_info.update(op=op, pass_=pass_, shape=str(shape), layout=layout)
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1, iterations=1)

    shape_id = f"{'x'.join(map(str, shape))} {layout}"
    med = {v: statistics.median(ts) for v, ts in times.items()}
    for v, ts in times.items():
        if v == "copy":
            continue
        ts = sorted(ts)
        recorder.row(op, v, pass_, shape_id, torch.float32, "time_ms", med[v] * 1e3,
                     ts[len(ts) // 5] * 1e3, ts[(4 * len(ts)) // 5] * 1e3)
    fw, bw = FLOOR_TRANSFERS[op]
    transfers = fw + bw if PASSES[pass_][2] else fw
    recorder.row(op, "floor", pass_, shape_id, torch.float32, "time_ms", med["copy"] * 1e3 * transfers / 2)
    recorder.row(op, "copy", "copy", shape_id, torch.float32, "GB_per_s",
                 2 * x.numel() * x.element_size() / med["copy"] / 1e9)
    ratios = ", ".join(f"{v} {med[v] / med['fused']:.2f}x" for v in VARIANTS[op] if v != "fused")
    print(f"\n{op} {pass_} {shape_id}: fused {med['fused'] * 1e3:.3g} ms; fused speed-up vs {ratios}")
    return med


def saved_bytes(recorder, op: str, variant: str, model: Callable, shape):
    """Bytes saved for backward (:func:`attnkern.compare.saved_bytes`) over the input's bytes."""
    from attnkern.compare import saved_bytes as count

    x = torch.randn(shape).requires_grad_()
    recorder.row(op, variant, "saved", shape, torch.float32, "saved_over_input",
                 count(model, x) / (x.numel() * x.element_size()))
