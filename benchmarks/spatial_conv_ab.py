"""The fused CBAM block with its spatial convolution run by ``attnkern::spatial_conv`` (the
direct C++ kernels, ``csrc/spatial_conv.cpp``) and by oneDNN (``torch.nn.functional.conv2d``,
what a no-op forward hook on the module's convolution keeps), in one process, call by call in
alternation: what the direct kernels save in a block.

For each shape and layout, a forward in eval mode under ``torch.no_grad`` and a training step
(forward+backward), as ``test_bench_blocks.py`` runs them; the two sides alternate, their order
swapped every round, each turn an untimed call then a timed one, medians of ``--rounds``
timed calls each, in milliseconds. The convolution alone is timed too.

    python benchmarks/spatial_conv_ab.py [--rounds 11] [--layouts nchw,channels_last]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gating_bench import SHAPES, _input, _step  # noqa: E402

from attnkern import _cpu  # noqa: E402
from attnkern.compare import make_variant, median_time  # noqa: E402

PASSES = ("fwd eval no_grad", "fwd+bwd train")


def _median_ms(fn, rounds: int) -> float:
    return median_time(fn, rounds=rounds, warmup=1) * 1e3


def conv_alone(shape, rounds: int) -> str:
    """One row: oneDNN's forward and backward (channels_last, as the module handed it before)
    and the direct kernels', for the block's [B, 2, H, W] maps, k = 7."""
    B, _, H, W = shape
    s, w, g = torch.randn(B, 2, H, W), torch.randn(1, 2, 7, 7), torch.randn(B, 1, H, W)
    s_cl, g_cl = (t.contiguous(memory_format=torch.channels_last) for t in (s, g))
    ops = torch.ops.attnkern
    onednn_f = _median_ms(lambda: torch.nn.functional.conv2d(s_cl, w, padding=3), rounds)
    onednn_b = _median_ms(lambda: torch.ops.aten.convolution_backward(
        g_cl, s_cl, w, None, [1, 1], [3, 3], [1, 1], False, [0, 0], 1, [True, True, False]), rounds)
    ours_f = _median_ms(lambda: ops.spatial_conv(s, w), rounds)
    ours_b = _median_ms(lambda: ops.spatial_conv_backward(g, s, w, True, True), rounds)
    return (f"| {B}x2x{H}x{W} | {onednn_f:.3f} | {ours_f:.3f} | {onednn_f / ours_f:.1f}x | {onednn_b:.3f} | "
            f"{ours_b:.3f} | {onednn_b / ours_b:.1f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--layouts", default="nchw,channels_last", type=lambda s: s.split(","))
    args = parser.parse_args()
    _cpu.require()
    print(f"{_cpu.cpu_model()}, {torch.get_num_threads()} threads, float32")
    print("| maps | oneDNN fwd ms | direct fwd ms | speed-up | oneDNN bwd ms | direct bwd ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        print(conv_alone(shape, args.rounds), flush=True)
    print()
    print("| pass | shape | layout | oneDNN's conv ms | direct conv ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for pass_ in PASSES:
        train = pass_.startswith("fwd+bwd")
        for shape in SHAPES:
            for layout in args.layouts:
                x, g = _input(shape, layout), _input(shape, layout)
                model = make_variant("cbam", "fused", shape[1], train=train)
                step = _step(model, pass_, x, g)
                conv = model.spatial.conv.conv
                times = {"onednn": [], "direct": []}
                for r in range(args.rounds):
                    for side in (("onednn", "direct") if r % 2 else ("direct", "onednn")):
                        hook = conv.register_forward_hook(lambda *a: None) if side == "onednn" else None
                        try:
                            step()
                            t0 = time.perf_counter()
                            step()
                            times[side].append(time.perf_counter() - t0)
                        finally:
                            if hook is not None:
                                hook.remove()
                old, new = (statistics.median(times[s]) * 1e3 for s in ("onednn", "direct"))
                print(f"| {pass_} | {'x'.join(map(str, shape))} | {layout} | {old:.2f} | {new:.2f} | "
                      f"{old / new:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
