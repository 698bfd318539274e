"""Per-call cost of the fused SE and CBAM blocks at batch 1 under ``torch.inference_mode``:
the direct path (the blocks call the primitives, no autograd nodes), the same blocks forced
through their autograd nodes (``BlockPasses`` built under ``torch.enable_grad()``, as before the
direct path), and timm's module. One process, interleaved rounds; medians of 9 rounds of 100
calls, in microseconds.

    python benchmarks/block_call_overhead.py
"""
import statistics
import time

import torch

from attnkern.compare import make_variant
from attnkern.ops import gating

_direct_init = gating.BlockPasses.__init__


def _through_nodes_init(self, primitives=None):
    with torch.enable_grad():
        _direct_init(self, primitives)


def _per_call_us(module, x, calls=100):
    t0 = time.perf_counter()
    for _ in range(calls):
        module(x)
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    for op, shape in (("se", (1, 256, 8, 8)), ("se", (1, 1024, 16, 16)),
                      ("cbam", (1, 256, 8, 8)), ("cbam", (1, 1024, 16, 16))):
        fused = make_variant(op, "fused", shape[1], train=False)
        timm = make_variant(op, "timm", shape[1], train=False)
        x = torch.randn(shape)
        times = {"direct": [], "through the nodes": [], "timm": []}
        with torch.inference_mode():
            for _ in range(3):  # warm-up
                _per_call_us(fused, x)
                _per_call_us(timm, x)
            try:
                for _ in range(9):
                    gating.BlockPasses.__init__ = _direct_init
                    times["direct"].append(_per_call_us(fused, x))
                    gating.BlockPasses.__init__ = _through_nodes_init
                    times["through the nodes"].append(_per_call_us(fused, x))
                    gating.BlockPasses.__init__ = _direct_init
                    times["timm"].append(_per_call_us(timm, x))
            finally:
                gating.BlockPasses.__init__ = _direct_init
        print(op, "x".join(map(str, shape)), ", ".join(f"{k} {statistics.median(v):.0f} us" for k, v in times.items()))


if __name__ == "__main__":
    main()
