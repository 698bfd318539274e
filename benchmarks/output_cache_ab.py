"""The fused blocks with the C++ kernels' output cache on and off (``csrc/output_cache.cpp``),
in one process, call by call in alternation, with the C library's malloc as users have it:
how much of a block's time the page faults of its fresh x-sized outputs took.

For each block, shape and layout, a forward in eval mode under ``torch.no_grad`` and a training
step (forward+backward), as ``test_bench_blocks.py`` runs them; the two sides alternate, each
turn an untimed call then a timed one (turning the cache off frees its blocks, so the "on"
side's untimed call refills it), medians of ``--rounds`` timed calls each, in milliseconds.

    python benchmarks/output_cache_ab.py [--ops cbam,se,bam] [--rounds 9]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gating_bench import PASSES_OF, SHAPES, _input, _step  # noqa: E402

from attnkern import _cpu  # noqa: E402
from attnkern.compare import make_variant  # noqa: E402

PASSES = ("fwd eval no_grad", "fwd+bwd train")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="cbam,se,bam", type=lambda s: s.split(","))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--layouts", default="nchw,channels_last", type=lambda s: s.split(","))
    args = parser.parse_args()
    limit = _cpu.output_cache_info()["limit_bytes"] >> 20
    if limit == 0:
        raise SystemExit("the output cache is off (ATTNKERN_CPU_OUTPUT_CACHE_MB=0): nothing to compare")
    print(f"{_cpu.cpu_model()}, {torch.get_num_threads()} threads, float32, cache limit {limit} MB")
    print("| block | pass | shape | layout | cache off ms | cache on ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for op in args.ops:
        for pass_ in (p for p in PASSES if p in PASSES_OF[op]):
            train = pass_.startswith("fwd+bwd")
            for shape in SHAPES:
                if op == "bam" and train and shape[0] == 1:
                    continue  # BAM's BatchNorm1d needs B > 1 in training
                for layout in args.layouts:
                    x, g = _input(shape, layout), _input(shape, layout)
                    step = _step(make_variant(op, "fused", shape[1], train=train), pass_, x, g)
                    times = {"off": [], "on": []}
                    for r in range(args.rounds):
                        for side in (("off", "on") if r % 2 else ("on", "off")):
                            # turning the cache off frees its blocks: each side first runs one
                            # untimed call in its own state (the "on" side's fills the cache)
                            _cpu.set_output_cache_limit(0 if side == "off" else limit)
                            step()
                            t0 = time.perf_counter()
                            step()
                            times[side].append(time.perf_counter() - t0)
                    _cpu.set_output_cache_limit(limit)
                    off, on = (statistics.median(times[s]) * 1e3 for s in ("off", "on"))
                    print(f"| {op} | {pass_} | {'x'.join(map(str, shape))} | {layout} | {off:.2f} | {on:.2f} | "
                          f"{off / on:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
