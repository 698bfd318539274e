"""A/B timing of the C++ gating primitives, for changes too small to read off the primitive
table on a noisy host: the two sides run alternately, and a control primitive that the change
does not touch runs beside them.

Two modes, both from DRAM (the caches are flushed before every call, as in
``test_bench_primitives.py``), medians of ``--calls`` calls per run:

* ``capabilities A,B``: two ISA copies of one build in one process, alternating call by call
  (``AVX512,AVX512_BF16``);
* ``builds DIR_A DIR_B``: two builds (folders holding ``_C*.so``) in alternating processes
  (``ATTNKERN_EXTENSION_DIR``), each process timing every case once per run.

    python benchmarks/ab_primitives.py capabilities AVX512,AVX512_BF16 --dtype bfloat16 \\
        --ops gate_apply,gating_input_grad,bam_combine,spatial_stats
    python benchmarks/ab_primitives.py builds /tmp/before attnkern --capabilities AVX512_BF16,AVX2 \\
        --ops gating_input_grad,spatial_stats --layouts nchw --runs 6

``--in-cache`` (builds mode) times each sample as 20 calls back to back without flushing, so
that the input stays in cache (pick shapes of a few MB, and ``--threads 1``): the compute of a
pass, which sets its speed whenever memory is fast.

Prints, per case, the median of the runs' medians for each side (ms) and the median of the
per-run ratios A/B with their range.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_bench_primitives as P  # noqa: E402  (its inputs, eviction buffer and median)

SHAPES = "8x256x56x56,16x512x28x28,32x64x112x112,1x256x56x56"


def _input(shape, layout, dtype):
    x = torch.randn(shape).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _cases(args):
    for shape in args.shapes:
        for layout in args.layouts:
            for dtype in args.dtypes:
                yield shape, layout, dtype


def _key(shape, layout, dtype, op, side=""):
    return f"{side}{'x'.join(map(str, shape))} {layout} {str(dtype)[6:]} {op}"


def run_capabilities(args, a, b):
    """One run: per case, the median of --calls calls of each copy, alternating call by call."""
    from attnkern import _cpu

    out = {}
    for shape, layout, dtype in _cases(args):
        calls = P._calls(_input(shape, layout, dtype))
        for op in args.ops:
            fn, ts = calls[op], {a: [], b: []}
            for cap in (a, b):
                _cpu.set_cpu_capability(cap)
                fn()
            for _ in range(args.calls):
                for cap in (a, b):
                    _cpu.set_cpu_capability(cap)
                    P._EVICT.fill_(1.0)
                    t0 = time.perf_counter()
                    fn()
                    ts[cap].append(time.perf_counter() - t0)
            for cap in (a, b):
                out[_key(shape, layout, dtype, op, f"{cap} ")] = statistics.median(ts[cap])
    return out


def _median_in_cache(fn, calls, repeat=20):
    """The median over `calls` samples of one call's time, each sample `repeat` calls back to
    back with no flush between them."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        ts.append((time.perf_counter() - t0) / repeat)
    return statistics.median(ts)


def run_one_build(args):
    """One run in this process (the build ATTNKERN_EXTENSION_DIR names), every capability asked."""
    from attnkern import _cpu

    timer = _median_in_cache if args.in_cache else P._median
    out = {}
    for cap in args.capabilities:
        _cpu.set_cpu_capability(cap)
        for shape, layout, dtype in _cases(args):
            calls = P._calls(_input(shape, layout, dtype))
            for op in args.ops:
                out[_key(shape, layout, dtype, op, f"{cap} ")] = timer(calls[op], args.calls)
    return out


def _report(runs_a, runs_b):
    for key in runs_a[0]:
        ta = statistics.median(r[key] for r in runs_a)
        tb = statistics.median(r[key] for r in runs_b)
        ratios = [ra[key] / rb[key] for ra, rb in zip(runs_a, runs_b)]
        print(f"{key:56s} {ta * 1e3:8.3f} -> {tb * 1e3:8.3f} ms  {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["capabilities", "builds", "_one-build"])
    parser.add_argument("sides", nargs="+", help="A,B capabilities, or the two build folders")
    parser.add_argument("--ops", default="gating_input_grad,spatial_stats", type=lambda s: s.split(","))
    parser.add_argument("--shapes", default=SHAPES,
                        type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")])
    parser.add_argument("--layouts", default="nchw,channels_last", type=lambda s: s.split(","))
    parser.add_argument("--dtype", dest="dtypes", default="float32,bfloat16",
                        type=lambda s: [getattr(torch, d) for d in s.split(",")])
    parser.add_argument("--capabilities", default="AVX512", type=lambda s: s.split(","),
                        help="builds mode: the ISA copies to time in each build")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-cache", action="store_true",
                        help="builds mode: no flush; each sample is 20 calls back to back")
    args = parser.parse_args(argv)
    if args.in_cache and args.mode == "capabilities":
        parser.error("--in-cache: builds mode only")
    torch.set_num_threads(args.threads)
    from attnkern.slides.allocator import apply

    apply("auto")  # keep large blocks: no page faults inside the timed calls
    if args.mode == "_one-build":
        print(json.dumps(run_one_build(args)))
        return 0
    if args.mode == "capabilities":
        a, b = args.sides[0].split(",")
        runs = [run_capabilities(args, a, b) for _ in range(args.runs)]
        pick = lambda run, cap: {k[len(cap) + 1:]: v for k, v in run.items() if k.startswith(cap + " ")}  # noqa: E731
        _report([pick(r, a) for r in runs], [pick(r, b) for r in runs])
        return 0
    dirs = args.sides
    child = [sys.executable, os.path.abspath(__file__), "_one-build", "-"] + (argv or sys.argv[1:])[3:]
    runs = {d: [] for d in dirs}
    for i in range(args.runs):
        for d in dirs if i % 2 == 0 else dirs[::-1]:  # alternate which build goes first
            env = dict(os.environ, ATTNKERN_EXTENSION_DIR=os.path.abspath(d))
            res = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            runs[d].append(json.loads(res.stdout.strip().splitlines()[-1]))
    _report(runs[dirs[0]], runs[dirs[1]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
