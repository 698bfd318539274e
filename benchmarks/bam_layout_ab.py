"""The fused BAM block's training step with its spatial branch's dilated convolutions on
channels_last copies (BatchNorms on NCHW maps, ``attnkern.nn.bam.CHANNELS_LAST_CONV_MAX_WIDTH``)
and with every layer in the input's layout, in one process, the two sides alternating call by
call (order swapped every round), each turn an untimed call then a timed one; medians of
``--rounds`` timed calls each, in milliseconds. The branch's width is C / 16.

    python benchmarks/bam_layout_ab.py [--rounds 7] [--shapes 32x64x112x112,16x128x56x56]

(Eval is not timed: without a gradient the branch keeps one layout.)
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
from attnkern.nn import bam as bam_module  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", default="32x64x112x112,16x128x56x56,8x128x112x112,8x256x56x56,16x512x28x28",
                        type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")])
    parser.add_argument("--layouts", default="nchw,channels_last", type=lambda s: s.split(","))
    args = parser.parse_args()
    width = bam_module.CHANNELS_LAST_CONV_MAX_WIDTH
    print(f"{_cpu.cpu_model()}, {torch.get_num_threads()} threads, float32")
    print("| pass | shape | branch width | layout | one layout ms | split layouts ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for pass_ in ("fwd+bwd train",):
        train = True
        for shape in args.shapes:
            for layout in args.layouts:
                x, g = _input(shape, layout), _input(shape, layout)
                step = _step(make_variant("bam", "fused", shape[1], train=train), pass_, x, g)
                times = {"one": [], "split": []}
                try:
                    for r in range(args.rounds):
                        for side in (("one", "split") if r % 2 else ("split", "one")):
                            # "split": every width takes the channels_last convolutions
                            bam_module.CHANNELS_LAST_CONV_MAX_WIDTH = 1 << 30 if side == "split" else 0
                            step()
                            t0 = time.perf_counter()
                            step()
                            times[side].append(time.perf_counter() - t0)
                finally:
                    bam_module.CHANNELS_LAST_CONV_MAX_WIDTH = width
                one, split = (statistics.median(times[s]) * 1e3 for s in ("one", "split"))
                print(f"| {pass_} | {'x'.join(map(str, shape))} | {shape[1] // 16} | {layout} | {one:.2f} | "
                      f"{split:.2f} | {one / split:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
