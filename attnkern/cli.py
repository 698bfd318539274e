"""The ``attnkern`` command.

    attnkern profile [SLIDE] [--model cbam_resnet50] [--tile 256] [--level 0] [--batch 16]
                     [--workers 1] [--compare naive,compile,fused,fused-compile]
                     [--max-tiles 64] [--train] [--explain attention|gradcam|cam|guided-gradcam]
                     [--sample K] [--out DIR]
                     [--device cpu|cuda] [--amp auto|bf16|fp16|off] [--[no-]channels-last] [--trace]

profiles a model over the tissue of a slide (the built-in sample slide without SLIDE) with and
without attnkern's kernels, and writes report.json, report.md, heatmap.png and mask.png.

    attnkern compare [--op cbam|se|bam|all] [--shape B C H W] [--rounds N]

prints the side-by-side table of the fused blocks against the reference, timm's eager modules
and ``torch.compile`` of them, measured in one run on this machine.
"""
from __future__ import annotations

import argparse
import os
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


def _profile(args) -> int:
    from .slides.profile import ProfileArgs, SlideError, markdown, profile

    pa = ProfileArgs(slide=args.slide, model=args.model, checkpoint=args.checkpoint, tile=args.tile,
                     level=args.level, batch=args.batch, workers=args.workers,
                     compare=[v.strip() for v in args.compare.split(",") if v.strip()], out=args.out,
                     max_tiles=args.max_tiles, device=args.device, progress=not args.no_progress,
                     train=args.train, explain=args.explain, amp=args.amp,
                     channels_last=args.channels_last, trace=args.trace,
                     sample=args.sample, sample_seed=args.sample_seed)
    try:
        report = profile(pa)
    except SlideError as e:
        print(f"attnkern profile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnkern profile: interrupted; partial report in {args.out}/report.json", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print(markdown(report))
        print(f"\nwrote {args.out}/report.json, report.md, heatmap.png, mask.png")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="attnkern", description="Fused attention kernels for vision models.")
    ap.add_argument("--version", action="version", version=f"attnkern {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="throughput and attention heatmap of a model over a slide")
    p.add_argument("slide", nargs="?", default=None, help="a slide (default: the built-in sample slide)")
    p.add_argument("--model", default="cbam_resnet50")
    p.add_argument("--checkpoint", default=None, help="a state_dict for the model (default: random weights)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--compare", default="naive,compile,fused,fused-compile",
                   help="variants, comma-separated: naive, compile, fused, fused-compile")
    p.add_argument("--max-tiles", type=int, default=64)
    p.add_argument("--out", default="results/profile")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train", action="store_true",
                   help="also time a training step (forward, backward, SGD) per batch")
    p.add_argument("--explain", choices=["attention", "gradcam", "cam", "guided-gradcam"], default="attention",
                   help="heatmap: the last CBAM's spatial gates (attention), Grad-CAM (any CNN), CAM of every "
                        "profiled tile computed in the timed forward (GAP + linear heads), or Grad-CAM plus a "
                        "gallery.png of guided Grad-CAM of the top-scoring tiles (ReLU CNNs)")
    p.add_argument("--sample", type=int, default=0, metavar="K",
                   help="also run attention sampling: K tiles drawn from the CAM of a coarse level, the slide-level "
                        "prediction estimated from them, set beside the exhaustive run (default 0: off)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the --sample draw (default 0)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast of the timed passes (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last model and tiles (default: on CUDA yes, on CPU no)")
    p.add_argument("--trace", action="store_true",
                   help="write a torch.profiler trace of each variant's pass (trace-VARIANT.json)")
    p.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("compare", help="fused vs naive vs timm vs torch.compile, side by side")
    c.add_argument("--op", choices=["cbam", "se", "bam", "all"], default="cbam")
    c.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"), default=[8, 256, 56, 56])
    c.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    if args.command == "profile":
        return _profile(args)
    if args.command == "compare":
        if min(args.shape) < 1 or args.rounds < 1:
            ap.error("--shape sizes and --rounds must be positive")
        return _compare(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
