"""The fused BAM block's training step with the input gradient of its spatial branch's 1x1
projection added inside ``bam_input_grad``'s pass (dx written once) and with it added by a matrix
product into dx in place afterwards (two more transfers of dx), in one process, the sides
alternating call by call (order swapped every round), each turn an untimed call then a timed
one; medians of ``--rounds`` timed calls, in milliseconds. R = C / 16 is the projection's width
(``attnkern.ops.gating.FUSED_PROJECTION_GRAD_MAX_RANK`` is forced both ways).

    python benchmarks/bam_projection_grad_ab.py [--rounds 9] [--shapes 32x64x112x112,8x256x56x56]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gating_bench import _input, _step  # noqa: E402

from attnkern import _cpu  # noqa: E402
from attnkern.compare import make_variant  # noqa: E402
from attnkern.ops import gating  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--shapes", default="32x64x112x112,16x128x56x56,8x256x56x56,16x256x64x64,16x512x28x28",
                        type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")])
    parser.add_argument("--layouts", default="nchw,channels_last", type=lambda s: s.split(","))
    args = parser.parse_args()
    limit = gating.FUSED_PROJECTION_GRAD_MAX_RANK
    print(f"{_cpu.cpu_model()}, {torch.get_num_threads()} threads, float32")
    print("| shape | R | layout | separate ms | in the pass ms | speed-up |")
    print("|---|---|---|---|---|---|")
    try:
        for shape in args.shapes:
            for layout in args.layouts:
                x, g = _input(shape, layout), _input(shape, layout)
                step = _step(make_variant("bam", "fused", shape[1], train=True), "fwd+bwd train", x, g)
                times = {"separate": [], "fused": []}
                for r in range(args.rounds):
                    for side in (("separate", "fused") if r % 2 else ("fused", "separate")):
                        gating.FUSED_PROJECTION_GRAD_MAX_RANK = 1 << 30 if side == "fused" else 0
                        step()
                        t0 = time.perf_counter()
                        step()
                        times[side].append(time.perf_counter() - t0)
                sep, fused = (statistics.median(times[s]) * 1e3 for s in ("separate", "fused"))
                print(f"| {'x'.join(map(str, shape))} | {shape[1] // 16} | {layout} | {sep:.2f} | {fused:.2f} | "
                      f"{sep / fused:.2f}x |", flush=True)
    finally:
        gating.FUSED_PROJECTION_GRAD_MAX_RANK = limit


if __name__ == "__main__":
    main()
