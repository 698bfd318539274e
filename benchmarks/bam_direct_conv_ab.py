"""The fused BAM block with its spatial branch's dilated convolutions run three ways, in one
process, the sides alternating call by call (order rotated every round), each turn an untimed
call then a timed one; medians of ``--rounds`` timed calls each, in milliseconds. The branch's
width is C / 16.

- ``onednn``: ``nn.Conv2d`` (oneDNN) on the branch's maps in the input's layout;
- ``cl-copies`` (training step only): oneDNN on channels_last copies of the maps, whose
  backward oneDNN runs several times faster at these widths, the BatchNorms on NCHW maps;
- ``direct``: attnkern's direct kernels (``attnkern.ops.dilated_conv``), what the block runs
  for branches up to ``attnkern.nn.bam.DIRECT_CONV_MAX_WIDTH`` channels wide.

Then the convolution alone on the branch's maps [B, C / 16, H, W] (3x3, dilation 4, with a
bias), oneDNN (``F.conv2d``, ``aten.convolution_backward``) against the direct kernels, forward
and backward (all three gradients), interleaved the same way.

    python benchmarks/bam_direct_conv_ab.py [--rounds 7] [--shapes 32x64x112x112,16x128x56x56]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gating_bench import _input, _step  # noqa: E402

from attnkern import _cpu  # noqa: E402
from attnkern.compare import make_variant  # noqa: E402
from attnkern.nn import bam as bam_module  # noqa: E402

_from_reduced = bam_module._SpatialBranch.from_reduced


def _from_reduced_cl_copies(self, h, pointwise=True):
    """The branch with each dilated convolution on a channels_last copy of its input."""
    h = torch.relu(self.bn_reduce(h.contiguous()))
    for conv, bn in zip(self.conv_di, self.bn_di):
        h = torch.relu(bn(conv(h.contiguous(memory_format=torch.channels_last)).contiguous()))
    return bam_module.pointwise_conv(self.conv_final, h)


def _use(side: str) -> None:
    bam_module.DIRECT_CONV_MAX_WIDTH = 1 << 30 if side == "direct" else 0
    bam_module._SpatialBranch.from_reduced = _from_reduced_cl_copies if side == "cl-copies" else _from_reduced


def _interleaved(fns, rounds):
    """Medians (ms) of each of ``fns`` (name -> callable), interleaved as in the block table."""
    times = {s: [] for s in fns}
    order = list(fns)
    for _ in range(rounds):
        for side in order:
            fns[side]()
            t0 = time.perf_counter()
            fns[side]()
            times[side].append(time.perf_counter() - t0)
        order.append(order.pop(0))
    return {s: statistics.median(t) * 1e3 for s, t in times.items()}


def _conv_table(shapes, layouts, rounds):
    print("\n| branch maps | layout | forward onednn ms | forward direct ms | speed-up | backward onednn ms | "
          "backward direct ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    ops = torch.ops.attnkern
    for B, C, H, W in shapes:
        c = max(1, C // 16)
        for layout in layouts:
            h, g = _input((B, c, H, W), layout), _input((B, c, H, W), layout)
            w, b = torch.randn(c, c, 3, 3) / (3 * c), torch.randn(c)
            med = _interleaved({
                "fwd onednn": lambda: F.conv2d(h, w, b, padding=4, dilation=4),
                "fwd direct": lambda: ops.dilated_conv(h, w, b, 4),
                "bwd onednn": lambda: torch.ops.aten.convolution_backward(
                    g, h, w, [c], [1, 1], [4, 4], [4, 4], False, [0, 0], 1, [True, True, True]),
                "bwd direct": lambda: ops.dilated_conv_backward(g, h, w, 4, [True, True, True]),
            }, rounds)
            print(f"| {B}x{c}x{H}x{W} | {layout} | {med['fwd onednn']:.3f} | {med['fwd direct']:.3f} | "
                  f"{med['fwd onednn'] / med['fwd direct']:.2f}x | {med['bwd onednn']:.3f} | {med['bwd direct']:.3f} | "
                  f"{med['bwd onednn'] / med['bwd direct']:.2f}x |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", default="32x64x112x112,16x128x56x56,8x128x112x112,8x256x56x56,16x512x28x28",
                        type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")])
    parser.add_argument("--layouts", default="nchw,channels_last", type=lambda s: s.split(","))
    parser.add_argument("--passes", default="fwd eval no_grad,fwd+bwd train", type=lambda s: s.split(","))
    args = parser.parse_args()
    width = bam_module.DIRECT_CONV_MAX_WIDTH
    print(f"{_cpu.cpu_model()}, {torch.get_num_threads()} threads, float32")
    print("| pass | shape | branch width | layout | onednn ms | cl-copies ms | direct ms | direct vs onednn | "
          "direct vs cl-copies |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for pass_ in args.passes:
            train = "train" in pass_
            sides = ["onednn", "cl-copies", "direct"] if train else ["onednn", "direct"]
            for shape in args.shapes:
                for layout in args.layouts:
                    x, g = _input(shape, layout), _input(shape, layout)
                    step = _step(make_variant("bam", "fused", shape[1], train=train), pass_, x, g)

                    def run(side):
                        _use(side)
                        step()
                    med = _interleaved({s: (lambda s=s: run(s)) for s in sides}, args.rounds)
                    cl, direct = med.get("cl-copies"), med["direct"]
                    cl_ms, cl_ratio = ("-", "-") if cl is None else (f"{cl:.2f}", f"{cl / direct:.2f}x")
                    print(f"| {pass_} | {'x'.join(map(str, shape))} | {shape[1] // 16} | {layout} | "
                          f"{med['onednn']:.2f} | {cl_ms} | {direct:.2f} | {med['onednn'] / direct:.2f}x | {cl_ratio} |",
                          flush=True)
    finally:
        bam_module.DIRECT_CONV_MAX_WIDTH = width
        bam_module._SpatialBranch.from_reduced = _from_reduced
    _conv_table(args.shapes, args.layouts, args.rounds)


if __name__ == "__main__":
    main()
