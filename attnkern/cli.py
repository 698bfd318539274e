"""The ``attnkern`` command.

    attnkern compare [--op cbam|se|bam|all] [--shape B C H W] [--rounds N]

prints the side-by-side table of the fused blocks against the reference, timm's eager modules
and ``torch.compile`` of them, measured in one run on this machine.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__


def _compare(args) -> int:
    import torch

    from .compare import OPS, compare, table

    ops = OPS if args.op == "all" else (args.op,)
    shape = tuple(args.shape)
    print(f"attnkern {__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"medians of {args.rounds} calls, fp32, batch {shape[0]}, {shape[1]} channels, {shape[2]}x{shape[3]}",
          flush=True)
    for op in ops:
        print(f"\n{op}: measuring ...", file=sys.stderr, flush=True)
        print(table(compare(op, shape, rounds=args.rounds), shape), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="attnkern", description="Fused attention kernels for vision models.")
    ap.add_argument("--version", action="version", version=f"attnkern {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="fused vs naive vs timm vs torch.compile, side by side")
    c.add_argument("--op", choices=["cbam", "se", "bam", "all"], default="cbam")
    c.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"), default=[8, 256, 56, 56])
    c.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    if args.command == "compare":
        if min(args.shape) < 1 or args.rounds < 1:
            ap.error("--shape sizes and --rounds must be positive")
        return _compare(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
