"""The Triton gating kernels' tiling constants, swept on one CUDA GPU: each kernel that the CBAM
and SE blocks launch (training forward and backward) timed alone under each setting of the
constants in ``attnkern.triton._gating_common`` that decide how many programs a launch has.

A setting is a set of overrides of those module constants (read at each launch, so no reload is
needed). Per setting, shape, layout and dtype the block runs once with its launches recorded,
then each launch is timed alone: CUDA events around it, after a 256 MB write that evicts the L2
and keeps the GPU busy while the CPU launches the kernel (as ``triton.testing.do_bench`` does).
Output: one JSON line per kernel and a table of each block's summed kernel time per setting.

Usage: ``python benchmarks/gpu_tile_sweep.py [--out FILE.jsonl] [--budget SECONDS]``. With
``--dry-run`` it runs on the CPU under Triton's interpreter with a tiny shape, float32 and the
first two settings (checks the script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# "default" is the module's own constants (since the H200 sweep: a floor of 16 pixels).
SETTINGS = {
    "default": {},
    "min_block_hw_128": {"_MIN_BLOCK_HW": 128},
    "min_block_hw_32": {"_MIN_BLOCK_HW": 32},
    "more_splits": {"_TARGET_PROGRAMS": 4096, "_MIN_TILES_PER_SPLIT": 2},
}
SHAPES = [(8, 256, 56, 56), (16, 512, 28, 28), (32, 64, 112, 112)]
DRY_SHAPES = [(2, 16, 6, 5)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_tile_sweep.jsonl")
    p.add_argument("--budget", type=float, default=150.0, help="seconds; settings left are skipped")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["ATTNKERN_BACKEND"] = "triton"
    import torch

    import attnkern
    from attnkern.triton import _gating_common as common

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from gpu_check import _timer, record_block_launches, relaunch  # the GPU check's recording and timer

    device = torch.device("cpu" if a.dry_run else "cuda")
    seconds = _timer(device)

    def timed(fn):
        return seconds(fn, 10, 1) * 1e6

    settings = dict(list(SETTINGS.items())[:2]) if a.dry_run else SETTINGS
    defaults = {k: getattr(common, k) for s in settings.values() for k in s}
    deadline = time.monotonic() + a.budget
    totals = {}
    shapes = DRY_SHAPES if a.dry_run else SHAPES
    with open(a.out, "w") as out:
        for shape in shapes:
            for dtype in (torch.float32,) if a.dry_run else (torch.float32, torch.bfloat16):
                for cl in (False, True):
                    x = torch.randn(shape, device=device, dtype=dtype)
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                    for block, make in (("cbam", attnkern.CBAM), ("se", attnkern.SqueezeExcite)):
                        m = make(shape[1]).to(device=device, dtype=dtype).train()
                        for name, over in settings.items():
                            if time.monotonic() > deadline:
                                continue
                            for k, v in defaults.items():
                                setattr(common, k, over.get(k, v))
                            total = 0.0
                            for fn, args, grid, kwargs in record_block_launches(m, x):
                                us = timed(lambda: relaunch(fn, args, grid, kwargs))
                                total += us
                                g = grid if isinstance(grid, tuple) else None
                                rec = dict(setting=name, block=block, shape="x".join(map(str, shape)),
                                           layout="channels_last" if cl else "NCHW",
                                           dtype=str(dtype).replace("torch.", ""), kernel=fn.__name__,
                                           grid=g, us=round(us, 2),
                                           constexprs={k: v for k, v in kwargs.items() if k.isupper()},
                                           num_warps=kwargs.get("num_warps"))
                                out.write(json.dumps(rec, default=str) + "\n")
                            out.flush()
                            key = (block, "x".join(map(str, shape)), "channels_last" if cl else "NCHW",
                                   str(dtype).replace("torch.", ""))
                            totals.setdefault(key, {})[name] = total
        for k, v in defaults.items():
            setattr(common, k, v)
    names = list(settings)
    print("| block | shape | layout | dtype | " + " | ".join(f"{n} µs" for n in names) + " |")
    print("|" + "---|" * (4 + len(names)))
    for key, row in totals.items():
        print("| " + " | ".join(key) + " | " + " | ".join(f"{row[n]:.1f}" if n in row else "-" for n in names)
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
