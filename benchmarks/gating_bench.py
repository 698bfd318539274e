"""What the CBAM, SE and BAM benchmark suites share: the shapes, the timed steps, the memory
floor and the saved-for-backward count. Every suite compares, side by side in one run:
``fused`` (attnkern), ``naive`` (the reference), ``timm``/``torchvision``/``authors`` (the
eager module users have today) and ``compile`` (``torch.compile`` of that module).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

SHAPES = [(8, 256, 56, 56), (32, 64, 112, 112), (16, 512, 28, 28)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def copy_bandwidth(benchmark, recorder, op: str, shape, floors: Dict[str, int]):
    """Time a copy of x into a preallocated tensor (1 read + 1 write, no page faults) and record
    the memory floor of each pass structure: ``floors`` maps a pass to its reads + writes of
    x's size."""
    x = torch.randn(shape)
    y = torch.empty_like(x)
    med = recorder.time(benchmark, lambda: y.copy_(x), op=op, variant="copy", pass_="copy",
                        shape=shape, dtype=torch.float32, rounds=15)
    recorder.row(op, "copy", "copy", shape, torch.float32, "GB_per_s",
                 2 * x.numel() * x.element_size() / med / 1e9)
    for pass_, transfers in floors.items():
        recorder.row(op, "floor", pass_, shape, torch.float32, "time_ms", med * 1e3 * transfers / 2)


def forward(benchmark, recorder, op: str, variant: str, model: Callable, shape):
    x = torch.randn(shape)

    def fwd():
        with torch.no_grad():
            model(x)

    for _ in range(2 if variant == "compile" else 0):
        fwd()  # compile outside the timed rounds
    recorder.time(benchmark, fwd, op=op, variant=variant, pass_="fwd", shape=shape,
                  dtype=torch.float32, rounds=7)


def forward_backward(benchmark, recorder, op: str, variant: str, model: Callable, shape):
    x = torch.randn(shape).requires_grad_()
    g = torch.randn(shape)

    def step():
        x.grad = None
        model(x).backward(g)

    for _ in range(2 if variant == "compile" else 0):
        step()
    recorder.time(benchmark, step, op=op, variant=variant, pass_="fwd+bwd", shape=shape,
                  dtype=torch.float32, rounds=7)


def saved_bytes(recorder, op: str, variant: str, model: Callable, shape):
    """Bytes saved for backward (:func:`attnkern.compare.saved_bytes`) over the input's bytes."""
    from attnkern.compare import saved_bytes as count

    x = torch.randn(shape).requires_grad_()
    recorder.row(op, variant, "saved", shape, torch.float32, "saved_over_input",
                 count(model, x) / (x.numel() * x.element_size()))
