"""The GPU check: attnkern's tests, kernel bandwidth, attention throughput and the profile job on
one CUDA GPU, in at most 8 minutes, written to ``benchmarks/RESULTS-gpu.md``.

Stages (each in its own process, each with a time budget; what a stage measured before its
budget ran out is kept and the rest is marked as skipped):

``tests``    the Triton test matrix (tests/triton) on CUDA, files interleaved
             so that every file is reached before the budget ends
``gating``   every Triton kernel that the CBAM, SE and BAM blocks launch (forward and backward),
             relaunched alone and timed with CUDA events: GB/s, counting each tensor argument as
             read or written once, and that as a share of a device-to-device copy of x
``sdpa``     ``attnkern.scaled_dot_product_attention`` against torch's FlashAttention-2 and
             memory-efficient backends (``torch.nn.attention.sdpa_kernel``), forward and
             forward+backward, head dim 64 and 128, 1k/4k/16k tokens, bf16 and fp16, causal and
             not, in TFLOP/s counted as FlashAttention's benchmarks count: 4*B*H*N^2*D for the
             forward, 2.5x that for the backward, half for causal
``profile``  ``attnkern profile`` on the built-in sample slide with bf16 autocast, channels_last
             and the four variants (naive, compile, fused, fused-compile)

``--dry-run`` runs the same stages on the CPU with tiny shapes (Triton under the interpreter,
a handful of tests, the profile job without its two torch.compile variants) and writes to a
temporary file, never to ``benchmarks/RESULTS-gpu.md``.

Usage: ``scripts/gpu_check.sh`` (or ``python scripts/gpu_check.py``) [--dry-run] [--out FILE]
[--stages tests,gating,sdpa,profile].
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS-gpu.md")
STAGES = ("tests", "gating", "sdpa", "profile")
# Seconds per stage on the GPU (480 s in all with the start-up of each process) and in a dry run.
BUDGET_GPU = {"tests": 190, "gating": 50, "sdpa": 80, "profile": 140}
BUDGET_DRY = {"tests": 150, "gating": 150, "sdpa": 150, "profile": 150}
TOTAL_GPU = 480
GRACE = 20  # seconds a stage may run past its budget before it is killed

# Shapes of the gating stage: the README's three block shapes (benchmarks/gating_bench.py README_SHAPES).
GATING_SHAPES_GPU = [(8, 256, 56, 56), (32, 64, 112, 112), (16, 512, 28, 28)]
GATING_SHAPES_DRY = [(2, 16, 6, 5)]
# SDPA: FlashAttention's benchmark grid (model width 2048, 16k tokens per batch).
SDPA_TOKENS_GPU = (1024, 4096, 16384)
SDPA_TOKENS_DRY = (32,)
SDPA_HEAD_DIMS = (64, 128)
# The profile job's slide: the built-in sample at this level-0 size.
PROFILE_SLIDE_GPU = 8192
PROFILE_SLIDE_DRY = 1024


# ------------------------------------------------------------------------------------------
# shared helpers (stage processes)
# ------------------------------------------------------------------------------------------

class Part:
    """A stage's results, rewritten after every measurement so that a killed stage keeps them."""

    def __init__(self, path: str, stage: str, budget: float):
        self.path = path
        self.data = {"stage": stage, "rows": [], "notes": [], "skipped": 0}
        self.deadline = time.monotonic() + budget

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, **row):
        self.data["rows"].append(row)
        self.flush()

    def note(self, text: str):
        self.data["notes"].append(text)
        self.flush()

    def flush(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, default=str)
        os.replace(tmp, self.path)


def _timer(device):
    """A function timing ``fn`` (median seconds of ``reps`` after ``warmup`` calls): CUDA events
    on a GPU, perf_counter on the CPU.

    On a GPU each timed call follows a write of 256 MB (four times the L2 of an H100/H200), as
    ``triton.testing.do_bench`` does: the call reads its inputs from device memory, not from the
    L2 that the previous call left warm, and the GPU is still busy with that write while the CPU
    launches the call, so a kernel shorter than its launch is timed, not the launch."""
    import torch

    flush = torch.empty(256 * 2 ** 20 // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def timed(fn, reps, warmup=2):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                flush.zero_()
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]

    return timed


# ------------------------------------------------------------------------------------------
# stage: tests (pytest plugin: interleaved order, time budget, outcome counts)
# ------------------------------------------------------------------------------------------

def pytest_collection_modifyitems(session, config, items):
    """Interleave the test files (round robin) so that a time budget reaches every file; with
    GPU_CHECK_MAX_TESTS keep that many tests, spread over the files."""
    if "GPU_CHECK_PART" not in os.environ:
        return
    by_file = {}
    for it in items:
        by_file.setdefault(it.nodeid.split("::")[0], []).append(it)
    order = []
    queues = list(by_file.values())
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    cap = int(os.environ.get("GPU_CHECK_MAX_TESTS", "0") or 0)
    if cap:
        order = order[:cap]
    items[:] = order


_OUTCOMES = {}


def pytest_runtest_setup(item):
    if "GPU_CHECK_PART" not in os.environ:
        return
    import pytest

    if time.time() > float(os.environ["GPU_CHECK_DEADLINE"]):
        pytest.skip("gpu_check: the stage's time budget is spent")


def pytest_runtest_logreport(report):
    if "GPU_CHECK_PART" not in os.environ:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        skipped_budget = report.skipped and "time budget" in str(report.longrepr)
        key = "budget" if skipped_budget else report.outcome
        f = report.nodeid.split("::")[0]
        _OUTCOMES.setdefault(f, {}).setdefault(key, 0)
        _OUTCOMES[f][key] += 1
        if report.failed:
            lines = [ln for ln in str(report.longrepr).splitlines() if ln.startswith("E ")]
            why = lines[0][1:].strip()[:160] if lines else (str(report.longrepr).splitlines() or [""])[-1][:160]
            _OUTCOMES[f].setdefault("failures", []).append(f"{report.nodeid}: {why}")
        if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist: the controller writes the counts
            return
        with open(os.environ["GPU_CHECK_PART"], "w") as fh:
            json.dump({"stage": "tests", "files": _OUTCOMES}, fh)


def stage_tests(part_path: str, budget: float, dry: bool) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "scripts"), env.get("PYTHONPATH", "")])
    env["GPU_CHECK_PART"] = part_path
    env["GPU_CHECK_DEADLINE"] = str(time.time() + budget)
    if dry:
        env["GPU_CHECK_MAX_TESTS"] = "2"
    # tests/triton is the Triton matrix, on CUDA tensors where a GPU is present. tests/ops runs the
    # dispatcher's backends on CPU tensors (the triton one under the interpreter): CI's suite.
    suites = ["tests/triton"]
    cmd = [sys.executable, "-m", "pytest", *suites, "-q", "-p", "gpu_check",
           "-p", "no:cacheprovider", "-rf"]
    # On a GPU machine the tests spend most of their time compiling Triton kernels, on the CPU:
    # with pytest-xdist at hand, processes compile side by side (each with its own CUDA context).
    if not dry and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(max(1, min(14, (os.cpu_count() or 1) - 2)))]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, timeout=budget + GRACE).returncode
    except subprocess.TimeoutExpired:
        return "killed (time budget)"


# ------------------------------------------------------------------------------------------
# stage: gating kernels' bandwidth
# ------------------------------------------------------------------------------------------

def _launch_class():
    from attnkern._backend import triton_interpret

    if triton_interpret():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction
    from triton.runtime.jit import JITFunction

    return JITFunction


def record_block_launches(block, x):
    """The Triton launches of one training step of ``block`` on ``x`` (its forward, then the
    backward of a gradient of ones): a list of (kernel, args, grid, kwargs)."""
    import torch

    cls = _launch_class()
    original = cls.run
    launches = []

    def recording_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, grid, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    cls.run = recording_run
    try:
        xg = x.detach().requires_grad_(True)
        out = block(xg)
        out.backward(torch.ones_like(out))
    finally:
        cls.run = original
    return launches


def relaunch(fn, args, grid, kwargs):
    """Launch a recorded kernel again, alone."""
    return _launch_class().run(fn, *args, grid=grid, warmup=False, **kwargs)


def _touched_bytes(t) -> int:
    """Bytes of a kernel's tensor argument, each element once (a broadcast view counts its
    storage, not its expanded size)."""
    n = t.numel()
    try:
        n = min(n, t.untyped_storage().nbytes() // t.element_size())
    except Exception:  # noqa: BLE001
        pass
    return n * t.element_size()


def stage_gating(part: Part, dry: bool) -> None:
    import torch

    import attnkern

    device = torch.device("cpu" if dry else "cuda")
    timed = _timer(device)
    blocks = [("cbam", lambda c: attnkern.CBAM(c)), ("se", lambda c: attnkern.SqueezeExcite(c)),
              ("bam", lambda c: attnkern.BAM(c))]
    shapes = GATING_SHAPES_DRY if dry else GATING_SHAPES_GPU
    reps, warmup = (1, 0) if dry else (20, 2)
    for dtype in (torch.float32,) if dry else (torch.float32, torch.bfloat16):
        for shape in shapes:
            for cl in (False, True):
                layout = "channels_last" if cl else "NCHW"
                fmt = torch.channels_last if cl else torch.contiguous_format
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                y = torch.empty_like(x)
                copy_s = timed(lambda: y.copy_(x), reps, warmup)
                copy_gbs = 2 * x.numel() * x.element_size() / copy_s / 1e9
                for name, make in blocks:
                    if part.left() <= 0:
                        part.data["skipped"] += 1
                        part.flush()
                        continue
                    m = make(shape[1]).to(device=device, dtype=dtype).train()
                    seen = set()
                    for fn, args, grid, kwargs in record_block_launches(m, x):
                        tensors = [a for a in args if isinstance(a, torch.Tensor)]
                        key = (fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__,
                               tuple((tuple(t.shape), t.dtype) for t in tensors),
                               tuple(sorted((k, str(v)) for k, v in kwargs.items())))
                        if key in seen:
                            continue
                        seen.add(key)
                        ptrs = {}
                        for t in tensors:
                            ptrs[t.data_ptr()] = max(ptrs.get(t.data_ptr(), 0), _touched_bytes(t))
                        nbytes = sum(ptrs.values())
                        s = timed(lambda: relaunch(fn, args, grid, kwargs), reps, warmup)
                        gbs = nbytes / s / 1e9
                        part.add(block=name, kernel=key[0], shape="x".join(map(str, shape)), layout=layout,
                                 dtype=str(dtype).replace("torch.", ""), us=s * 1e6, mb=nbytes / 1e6,
                                 gbs=gbs, copy_gbs=copy_gbs, share=gbs / copy_gbs)


# ------------------------------------------------------------------------------------------
# stage: SDPA throughput
# ------------------------------------------------------------------------------------------

def sdpa_flops(batch, heads, n, d, causal, backward):
    """FLOPs as FlashAttention's benchmarks count them (benchmarks/benchmark_flash_attention.py):
    4*B*H*N^2*D forward, 2.5x that backward (so 3.5x for forward+backward), half if causal."""
    f = 4 * batch * heads * n * n * d / (2 if causal else 1)
    return f * (3.5 if backward else 1.0)


def stage_sdpa(part: Part, dry: bool) -> None:
    import torch
    import torch.nn.functional as F

    import attnkern

    device = torch.device("cpu" if dry else "cuda")
    timed = _timer(device)
    backends = {"attnkern": None}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends["torch flash"] = SDPBackend.FLASH_ATTENTION
        backends["torch mem-efficient"] = SDPBackend.EFFICIENT_ATTENTION
        if dry:  # the CPU has neither: its own flash kernel stands in, to run the same code
            backends = {"attnkern": None, "torch math": SDPBackend.MATH}
    except ImportError as e:
        part.note(f"torch.nn.attention unavailable: {e}")
    tokens = SDPA_TOKENS_DRY if dry else SDPA_TOKENS_GPU
    dims = (16,) if dry else SDPA_HEAD_DIMS
    reps, warmup = (1, 0) if dry else (5, 1)
    width, total = (32, 64) if dry else (2048, 16384)
    part.note("attnkern runs its fixed tiles (the kernels' deterministic launch path): autotuning "
              "every shape key would not fit the time budget")
    for causal in (False, True):
        for dtype in (torch.bfloat16,) if dry else (torch.bfloat16, torch.float16):
            for d in dims:
                for n in tokens:
                    b, h = max(1, total // n), width // d
                    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True)
                               for _ in range(3))
                    g = torch.randn(b, h, n, d, device=device, dtype=dtype)
                    for bname, sdp in backends.items():
                        for backward in (False, True):
                            if part.left() <= 0:
                                part.data["skipped"] += 1
                                part.flush()
                                continue

                            def run():
                                if bname == "attnkern":
                                    det = torch.are_deterministic_algorithms_enabled()
                                    torch.use_deterministic_algorithms(True)
                                    try:
                                        o = attnkern.scaled_dot_product_attention(q, k, v, is_causal=causal)
                                        if backward:
                                            o.backward(g)
                                    finally:
                                        torch.use_deterministic_algorithms(det)
                                    return
                                with sdpa_kernel(sdp):
                                    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                                    if backward:
                                        o.backward(g)

                            ctx = torch.enable_grad() if backward else torch.no_grad()
                            row = dict(backend=bname, pass_="fwd+bwd" if backward else "fwd", causal=causal,
                                       dtype=str(dtype).replace("torch.", ""), D=d, N=n, B=b, H=h)
                            try:
                                with ctx:
                                    s = timed(run, reps, warmup)
                            except Exception as e:  # noqa: BLE001 - a backend that refuses is a finding
                                part.add(**row, error=f"{type(e).__name__}: {str(e)[:200]}")
                                continue
                            fl = sdpa_flops(b, h, n, d, causal, backward)
                            part.add(**row, ms=s * 1e3, tflops=fl / s / 1e12)
                    del q, k, v, g


# ------------------------------------------------------------------------------------------
# stage: the profile job
# ------------------------------------------------------------------------------------------

def stage_profile(part_path: str, budget: float, dry: bool) -> int:
    out = tempfile.mkdtemp(prefix="gpu-check-profile-")
    t0 = time.time()
    # The built-in sample slide at a size that renders in seconds (it is cached afterwards).
    from attnkern.slides.sample import sample_slide_path

    slide = sample_slide_path(PROFILE_SLIDE_DRY if dry else PROFILE_SLIDE_GPU)
    prep = time.time() - t0
    if dry:
        args = ["--device", "cpu", "--model", "cbam_resnet18", "--tile", "32", "--batch", "2",
                "--max-tiles", "2", "--compare", "naive,fused", "--amp", "off", "--workers", "0"]
    else:
        args = ["--device", "cuda", "--batch", "64", "--max-tiles", "512",
                "--compare", "naive,compile,fused,fused-compile", "--amp", "bf16", "--workers", "4"]
    args = [slide] + args
    args += ["--channels-last", "--no-progress", "--out", out]
    cmd = [sys.executable, "-c", "import sys; from attnkern.cli import main; sys.exit(main(sys.argv[1:]))",
           "profile", *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # At the budget's end the job gets SIGINT, so that it writes the report of the variants it has
    # measured (the job writes report.md and report.json on its way out), then SIGKILL.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        rc, note = proc.wait(timeout=max(10.0, budget - prep)), ""
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=GRACE)
            note = f"interrupted at its {budget:.0f} s budget: the variants it measured"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            note = f"killed after its {budget:.0f} s budget"
        rc = -1
    data = {"stage": "profile", "rc": rc, "note": note, "seconds": time.time() - t0, "slide_seconds": prep,
            "command": "attnkern profile SLIDE " + " ".join(shlex.quote(a) for a in args[1:-1]) + " OUT",
            "slide": f"the built-in sample slide at {PROFILE_SLIDE_DRY if dry else PROFILE_SLIDE_GPU} px "
                     f"(attnkern.slides.sample.sample_slide_path; {prep:.0f} s to render or find)"}
    for name in ("report.md", "report.json"):
        p = os.path.join(out, name)
        if os.path.exists(p):
            with open(p) as f:
                data[name] = f.read() if name.endswith(".md") else json.load(f)
    with open(part_path, "w") as f:
        json.dump(data, f, default=str)
    return rc


# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------

def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(info, parts, walls, dry) -> str:
    out = [f"# attnkern on {info['device']}{' (DRY RUN on the CPU: tiny shapes, not figures)' if dry else ''}",
           "",
           f"Command: `{info['command']}` ({info['date']}; torch {info['torch']}, triton {info['triton']}, "
           f"CUDA {info['cuda']}, host CPU {info['cpu']}).",
           "",
           "Stage wall times: " + ", ".join(f"{s} {walls[s]:.0f} s" for s in walls) +
           f"; total {sum(walls.values()):.0f} s.", ""]
    t = parts.get("tests")
    if t:
        out += ["## Tests (tests/triton) on the device", ""]
        rows, failures = [], []
        for f, c in sorted(t.get("files", {}).items()):
            rows.append((f, c.get("passed", 0), c.get("failed", 0), c.get("skipped", 0), c.get("budget", 0)))
            failures += c.get("failures", [])
        tot = [sum(r[i] for r in rows) for i in range(1, 5)]
        out += [_table(["file", "passed", "failed", "skipped", "not run (budget)"],
                       rows + [("**all**", *tot)]), ""]
        out += [f"- FAILED {x}" for x in failures] + ([""] if failures else [])
    g = parts.get("gating")
    if g:
        out += ["## Gating kernels: bandwidth against a device copy", "",
                "Each kernel the block launches (training forward and backward), relaunched alone; bytes = "
                "every tensor argument read or written once; copy = `y.copy_(x)` of x's size "
                "(2 x its bytes).", ""]
        rows = [(r["block"], f"`{r['kernel']}`", r["shape"], r["layout"], r["dtype"], f"{r['us']:.1f}",
                 f"{r['mb']:.1f}", f"{r['gbs']:.0f}", f"{r['copy_gbs']:.0f}", f"{100 * r['share']:.0f}%")
                for r in g["rows"]]
        out += [_table(["block", "kernel", "shape", "layout", "dtype", "µs", "MB", "GB/s", "copy GB/s",
                        "share of copy"], rows), ""]
        if g.get("skipped"):
            out += [f"{g['skipped']} block runs not measured (time budget).", ""]
    s = parts.get("sdpa")
    if s:
        out += ["## Scaled dot-product attention, TFLOP/s", "",
                "B = 16384 / N, H = 2048 / D (FlashAttention's benchmark grid); FLOPs 4*B*H*N^2*D "
                "forward, 2.5x that backward, half for causal. " + " ".join(s.get("notes", [])), ""]
        rows = []
        keyed = {}
        for r in s["rows"]:
            k = (r["causal"], r["dtype"], r["D"], r["N"], r["pass_"])
            keyed.setdefault(k, {})[r["backend"]] = (f"{r['tflops']:.1f}" if "tflops" in r else
                                                     f"error: {r.get('error', '')[:60]}")
        backends = sorted({r["backend"] for r in s["rows"]}, key=lambda b: (b != "attnkern", b))
        for k, v in keyed.items():
            rows.append(("causal" if k[0] else "full", k[1], k[2], k[3], k[4], *[v.get(b, "-") for b in backends]))
        out += [_table(["mask", "dtype", "D", "N", "pass", *backends], rows), ""]
        if s.get("skipped"):
            out += [f"{s['skipped']} measurements not run (time budget).", ""]
    p = parts.get("profile")
    if p:
        out += ["## The profile job", "", f"`{p.get('command')}` on {p.get('slide')}: exit {p.get('rc')} "
                f"{p.get('note', '')}", ""]
        if p.get("report.md"):
            out += [p["report.md"].strip(), ""]
    for name in STAGES:
        if name in walls and name not in parts:
            out += [f"Stage {name}: no result (see the log).", ""]
    return "\n".join(out) + "\n"


def _info(dry, argv):
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    from attnkern._cpu import cpu_model

    cpu = cpu_model()
    dev = "CPU (dry run)" if dry else torch.cuda.get_device_name(0)
    return {"device": dev, "torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda,
            "cpu": cpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "scripts/gpu_check.sh" + "".join(" " + shlex.quote(a) for a in argv)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, temporary output")
    p.add_argument("--out", help="the report (default: benchmarks/RESULTS-gpu.md; a temporary file with --dry-run)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dry = a.dry_run
    if dry:  # before triton is first imported, here and in every stage process
        os.environ["TRITON_INTERPRET"] = "1"

    if a.stage:  # a stage process
        if dry:  # the blocks' kernels on CPU tensors are Triton's only when asked for
            os.environ["ATTNKERN_BACKEND"] = "triton"
        if a.stage == "gating":
            stage_gating(Part(a.part, "gating", a.budget), dry)
        elif a.stage == "sdpa":
            stage_sdpa(Part(a.part, "sdpa", a.budget), dry)
        return 0

    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"--stages: unknown {bad}; known: {', '.join(STAGES)}")
    out = a.out
    if dry:
        if out is None:
            out = os.path.join(tempfile.mkdtemp(prefix="gpu-check-"), "RESULTS-gpu-dry-run.md")
        if os.path.abspath(out) == os.path.abspath(RESULTS):
            p.error("--dry-run never writes benchmarks/RESULTS-gpu.md")
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run to check the script on the CPU)", file=sys.stderr)
            return 2
        out = out or RESULTS
    budgets = BUDGET_DRY if dry else BUDGET_GPU
    info = _info(dry, argv)
    print(f"gpu_check: {info['device']}, stages {', '.join(stages)}, report -> {out}", flush=True)
    parts, walls, status = {}, {}, {}
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for s in stages:
            budget = budgets[s]
            if not dry:
                budget = max(10.0, min(budget, TOTAL_GPU - (time.monotonic() - start) - GRACE))
            part = os.path.join(tmp, f"{s}.json")
            t0 = time.monotonic()
            print(f"gpu_check: stage {s} (budget {budget:.0f} s)", flush=True)
            try:
                if s == "tests":
                    status[s] = stage_tests(part, budget, dry)
                elif s == "profile":
                    status[s] = stage_profile(part, budget, dry)
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--stage", s, "--part", part,
                           "--budget", str(budget)] + (["--dry-run"] if dry else [])
                    env = dict(os.environ)
                    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
                    try:
                        status[s] = subprocess.run(cmd, cwd=ROOT, env=env, timeout=budget + GRACE).returncode
                    except subprocess.TimeoutExpired:
                        status[s] = "killed (time budget)"
            finally:
                walls[s] = time.monotonic() - t0
            if os.path.exists(part):
                with open(part) as f:
                    parts[s] = json.load(f)
            print(f"gpu_check: stage {s}: {walls[s]:.1f} s wall, exit {status[s]}", flush=True)
    text = render(info, parts, walls, dry)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    total = time.monotonic() - start
    print(f"gpu_check: wrote {out}; total {total:.1f} s; "
          + ", ".join(f"{s} {walls[s]:.1f} s" for s in walls), flush=True)
    failed = [s for s in stages if status.get(s) not in (0,) or s not in parts]
    if failed:
        print(f"gpu_check: stages with errors: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
