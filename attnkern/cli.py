"""The ``attnkern`` command (also ``python -m attnkern``).

    attnkern profile [SLIDE] [--model cbam_resnet50] [--tile 256] [--level 0 | --mpp UM | --magnification X]
                     [--batch 16] [--workers 1] [--compare naive,compile,fused,fused-compile]
                     [--max-tiles 64] [--train] [--explain attention|gradcam|cam|guided-gradcam]
                     [--sample K] [--out DIR]
                     [--device cpu|cuda] [--amp auto|bf16|fp16|off] [--[no-]channels-last] [--trace]

profiles a model over the tissue of a slide (the built-in sample slide without SLIDE) with and
without attnkern's kernels, and writes the report, the heatmap and the per-tile scores.

    attnkern compare [--op cbam|se|bam|all] [--shape B C H W] [--rounds N]

prints the side-by-side table of the fused blocks against the reference, timm's eager modules
and ``torch.compile`` of them, measured in one run on this machine.

Both commands need more than attnkern's core (torch and numpy): ``profile`` the ``slides``
extra (``pip install 'attnkern[slides]'``; ``--explain gradcam`` and ``guided-gradcam`` also
``explain``), ``compare`` timm (in ``slides``). A missing package gives a one-line error naming
the extra.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import __version__

# top-level module -> (distribution, extra that brings it)
EXTRAS = {
    "openslide": ("openslide-python / openslide-bin", "slides"),
    "tifffile": ("tifffile", "slides"),
    "skimage": ("scikit-image", "slides"),
    "scipy": ("scipy", "slides"),
    "matplotlib": ("matplotlib", "slides"),
    "PIL": ("pillow", "slides"),
    "tqdm": ("tqdm", "slides"),
    "psutil": ("psutil", "slides"),
    "timm": ("timm", "slides"),
    "torchvision": ("torchvision", "slides"),
    "pytorch_grad_cam": ("grad-cam", "explain"),
    "cv2": ("opencv-python (through grad-cam)", "explain"),
}


def missing_extra_message(command: str, err: ImportError) -> Optional[str]:
    """The one-line advice for a package that ``command`` needs and is not installed, or None
    when the missing module is none of the extras' (a real bug: let it raise)."""
    name = (getattr(err, "name", None) or "").split(".")[0]
    if name not in EXTRAS:
        return None
    dist, extra = EXTRAS[name]
    return (f"attnkern {command}: error: it needs {dist}, which is not installed; "
            f"pip install 'attnkern[{extra}]'")


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
                     level=0 if args.level is None else args.level, mpp=args.mpp,
                     magnification=args.magnification, batch=args.batch, workers=args.workers,
                     compare=[v.strip() for v in args.compare.split(",") if v.strip()], out=args.out,
                     max_tiles=args.max_tiles, device=args.device, progress=not args.no_progress,
                     train=args.train, explain=args.explain, amp=args.amp,
                     channels_last=args.channels_last, trace=args.trace,
                     sample=args.sample, sample_seed=args.sample_seed, allocator=args.allocator)
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
        print(f"\nwrote {len(report['files'])} files in {args.out}: "
              + ", ".join(f["file"] for f in report["files"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .slides.models import DESCRIPTIONS, EXPLAIN, MODELS, VARIANTS

    ap = argparse.ArgumentParser(prog="attnkern", description="Fused attention kernels for vision models: "
                                 "profile a model over a whole-slide image, or compare the fused blocks.")
    ap.add_argument("--version", action="version", version=f"attnkern {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{profile,compare}")
    models = "; ".join(f"{m}: {DESCRIPTIONS[m]}" for m in MODELS)
    p = sub.add_parser(
        "profile", help="throughput and attention heatmap of a model over a slide",
        description="Profile a model over the tissue of a slide with and without attnkern's kernels "
                    "(needs the 'slides' extra). Writes report.json, report.md, heatmap.png, heatmap.npy, "
                    "tiles.csv, tiles.geojson and mask.png into --out (and gallery.png with "
                    "--explain guided-gradcam).")
    p.add_argument("slide", nargs="?", default=None,
                   help="a whole-slide image OpenSlide reads (SVS, NDPI, MRXS, pyramidal TIFF, ...) "
                        "(default: the built-in sample slide, 16384 x 16384 px at 0.5 um/px)")
    p.add_argument("--model", default="cbam_resnet50", metavar="MODEL",
                   help=f"the timm model, random weights unless --checkpoint; one of: {models} "
                        "(default: %(default)s)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="a state_dict (.pt/.pth) for the model (default: random weights)")
    p.add_argument("--tile", type=int, default=256, metavar="PX",
                   help="tile side given to the model, in pixels (default: %(default)s)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, default=None, metavar="N",
                     help="read tiles at this pyramid level, 0 the full resolution (default: 0)")
    res.add_argument("--mpp", type=float, default=None, metavar="UM",
                     help="read tiles at this resolution in microns per pixel (e.g. 0.5), whatever the "
                          "levels: read at the nearest finer level and resized; needs the slide's "
                          "resolution metadata (default: off, --level 0)")
    res.add_argument("--magnification", type=float, default=None, metavar="X",
                     help="read tiles at this objective magnification (e.g. 20 for 20x), from the "
                          "slide's objective power, else taken as 10/X um/px (default: off, --level 0)")
    p.add_argument("--batch", type=int, default=16, metavar="N", help="tiles per batch (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="DataLoader worker processes reading tiles, 0 reads in the main process "
                        "(default: %(default)s)")
    p.add_argument("--compare", default=",".join(VARIANTS), metavar="LIST",
                   help="variants to time, comma-separated: naive (the model as timm builds it), "
                        "compile (torch.compile of it), fused (attnkern.convert), fused-compile "
                        "(default: %(default)s)")
    p.add_argument("--max-tiles", type=int, default=64, metavar="N",
                   help="tiles per timed pass, spread evenly over the tissue; the heatmap covers all "
                        "of it (default: %(default)s)")
    p.add_argument("--out", default="results/profile", metavar="DIR",
                   help="folder for the outputs, created if needed (default: %(default)s)")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="torch device: cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--train", action="store_true",
                   help="also time a training step (forward, backward, SGD) per batch (default: off)")
    p.add_argument("--explain", choices=list(EXPLAIN), default="attention",
                   help="the heatmap: attention is the last CBAM block's spatial gates (a ViT: the CLS "
                        "token's attention; other models: the probability of class 1); gradcam is "
                        "Grad-CAM of the predicted class, any CNN, needs the 'explain' extra; cam is the "
                        "class activation map of every profiled tile, computed inside the timed forward "
                        "(GAP + linear heads); guided-gradcam is gradcam plus gallery.png of guided "
                        "Grad-CAM of the top-scoring tiles (ReLU CNNs, 'explain' extra) "
                        "(default: %(default)s)")
    p.add_argument("--sample", type=int, default=0, metavar="K",
                   help="also run attention sampling: K tiles drawn from the CAM of a coarse level, the "
                        "slide-level prediction estimated from them, set beside the exhaustive run "
                        "(default: %(default)s, off)")
    p.add_argument("--sample-seed", type=int, default=0, metavar="SEED",
                   help="seed of the --sample draw (default: %(default)s)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast dtype of the timed passes; auto is bf16 on CUDA, off on CPU "
                        "(default: %(default)s)")
    p.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last model and tiles, the faster layout on CPU and GPU alike (default: on)")
    p.add_argument("--trace", action="store_true",
                   help="write a torch.profiler trace of each variant's pass, trace-VARIANT.json (default: off)")
    p.add_argument("--allocator", choices=["auto", "off"], default=os.environ.get("ATTNKERN_ALLOCATOR", "auto"),
                   help="memory allocator of every variant alike: auto preloads jemalloc or tcmalloc where "
                        "installed (the command reruns itself with LD_PRELOAD), else tunes glibc's malloc to keep "
                        "large blocks instead of unmapping them (fresh tensors cost page faults otherwise); off "
                        "leaves the C library's malloc as it is; the report names which ran (default: "
                        "$ATTNKERN_ALLOCATOR, else auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars shown)")
    c = sub.add_parser("compare", help="fused vs naive vs timm vs torch.compile, side by side",
                       description="Time the fused CBAM, SE and BAM blocks against the reference, timm's "
                                   "modules and torch.compile of them, on random fp32 inputs.")
    c.add_argument("--op", choices=["cbam", "se", "bam", "all"], default="cbam",
                   help="the block to time (default: %(default)s)")
    c.add_argument("--shape", type=int, nargs=4, metavar=("B", "C", "H", "W"), default=[8, 256, 56, 56],
                   help="input shape: batch, channels, height and width in elements (default: 8 256 56 56)")
    c.add_argument("--rounds", type=int, default=7, metavar="N",
                   help="timed calls per variant; the median is reported (default: %(default)s)")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "compare" and (min(args.shape) < 1 or args.rounds < 1):
        ap.error("--shape sizes and --rounds must be positive")
    if args.command == "profile" and argv is None:  # the command itself, not a call from Python
        from .slides.allocator import preload_rerun

        rerun = preload_rerun(args.allocator, sys.argv[1:])
        if rerun is not None:
            sys.stdout.flush()
            os.execve(sys.executable, *rerun)
    run = _profile if args.command == "profile" else _compare
    try:
        return run(args)
    except ImportError as e:
        msg = missing_extra_message(args.command, e)
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
