"""Compile every Triton kernel of attnkern ahead of time for real GPUs, with no GPU present.

Two steps, each in its own process:

1. ``capture`` (under ``TRITON_INTERPRET=1``, CPU tensors): drives the public ops (CBAM, SE and
   BAM blocks forward and backward, ``scaled_dot_product_attention`` forward and backward, the
   maps of ``attnkern.explain``) over a matrix of dtypes, layouts, shapes, head dims and mask
   kinds, with the Triton backend forced. The launchers are made to take the choices they take
   on a GPU (the interpreter check in ``attnkern.triton`` answers False and tensors report
   ``is_cuda``), and every kernel launch is recorded instead of run: the kernel, its arguments
   (dtype and 16-byte alignment of each tensor, the value of each scalar, since Triton
   specialises on them) and its constexprs and compile options. An autotuned launch records one
   launch per configuration its pruner keeps; deterministic mode (fixed tiles) is driven too.
   Kernel names and argument lists are not written anywhere here: they come from the launches.
2. ``compile`` (``TRITON_INTERPRET`` unset): for each distinct record and each target
   (``GPUTarget("cuda", 80, 32)``, ``GPUTarget("cuda", 90, 32)``), rebuilds Triton's own
   specialisation of the arguments for that target and runs ``triton.compile(ASTSource(...))``
   (ptxas included), then reads shared memory (metadata), registers and spill bytes (ptxas'
   log). A record fails on a compile error, no ptxas figures, or, if it must fit (a launch, or
   the fixed config a tuned launch falls back to), shared memory above the architecture's
   per-block limit or register spills. An autotune candidate that spills or needs too much
   shared memory is reported, not failed: on a GPU the pruner compiles each candidate before it
   is timed and drops such a one, so it is never chosen.

Usage::

    python benchmarks/compile_targets.py run --full --markdown out.md   # every record
    python benchmarks/compile_targets.py run --sample 12 --seed 7       # a seeded sample
    python benchmarks/compile_targets.py run --full --only must-fit --kernel _attn_fwd_kernel

``run`` prints per-kernel results and writes a JSON report (``--report``) and optionally the
Markdown table (``--markdown``) that ``benchmarks/RESULTS.md`` quotes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Shared memory a block may use (bytes): the opt-in maximum per block of each architecture
#: (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


# ------------------------------------------------------------------------------------------
# step 1: capture (interpreter process)
# ------------------------------------------------------------------------------------------

def _encode(v):
    import torch
    import triton.language as tl

    if isinstance(v, tl.constexpr):
        v = v.value
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).replace("torch.", ""), "aligned": v.data_ptr() % 16 == 0}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return {"int": v}
    if isinstance(v, float):
        return {"float": v}
    if isinstance(v, tl.dtype):
        return {"tl": v.name}
    raise TypeError(f"cannot record a kernel argument of type {type(v).__name__}: {v!r}")


class _Recorder:
    def __init__(self):
        self.records = {}
        self.launches = 0
        self.case = ""

    def add(self, fn, args, kwargs, role="launch"):
        """Record a launch. ``role``: "launch" (a kernel launched with these settings), "candidate"
        (an autotune config the pruner's estimates keep; on a GPU the pruner compiles it first and
        drops it if it does not fit) or "fallback" (the fixed config a tuned launch falls back to
        when no candidate fits). Only a record that is nothing but a candidate may not fit."""
        rec = {"module": fn.__module__, "qualname": fn.__qualname__,
               "args": [_encode(a) for a in args],
               "kwargs": {k: _encode(v) for k, v in sorted(kwargs.items())}}
        # One record per kernel, argument dtypes, constexprs and options; integer arguments
        # count only as "1" or not (Triton turns a 1 into a constant), not by their divisibility
        # by 16 (which only changes vector widths): one representative compile each.
        kinds = [("tensor", a["tensor"]) if isinstance(a, dict) and "tensor" in a else
                 ("int", a["int"] == 1) if isinstance(a, dict) and "int" in a else
                 ("float",) if isinstance(a, dict) and "float" in a else a for a in rec["args"]]
        key = json.dumps([rec["module"], rec["qualname"], kinds, rec["kwargs"]], sort_keys=True)
        self.launches += 1
        if key not in self.records:
            rec["case"] = self.case
            rec["roles"] = []
            self.records[key] = rec
        roles = self.records[key]["roles"]
        if role not in roles:
            roles.append(role)


@contextlib.contextmanager
def _as_on_gpu(recorder):
    """Launchers choose as on a GPU; launches are recorded, not run."""
    import torch
    from triton.runtime import autotuner, interpreter

    import attnkern._backend as backend
    import attnkern.triton as pkg
    import pkgutil
    import importlib

    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"attnkern.triton.{m.name}")
    checks = {backend.triton_interpret}
    launch = sys.modules.get("attnkern.triton._launch")
    if launch is not None and callable(getattr(launch, "interpret", None)):
        checks.add(launch.interpret)

    def not_interpreting():
        return False

    saved = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "attnkern.triton" or name.startswith("attnkern.triton.")):
            continue
        for attr, val in list(vars(mod).items()):
            if any(val is c for c in checks):
                saved.append((mod, attr, val))
                setattr(mod, attr, not_interpreting)

    def run(self, *args, grid, warmup, **kwargs):
        recorder.add(self.fn, args, kwargs)

    def tuned_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        pruned = self.prune_configs(kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        for cfg in pruned:
            recorder.add(self.fn.fn, args, {**kwargs, **cfg.all_kwargs()}, role="candidate")
        fallback = getattr(self.early_config_prune, "fallback", None)
        if fallback is not None:
            recorder.add(self.fn.fn, args, {**kwargs, **fallback(self.nargs, **kwargs).all_kwargs()},
                         role="fallback")
        self.nargs = None

    saved_run = interpreter.InterpretedFunction.run
    saved_tuned = autotuner.Autotuner.run
    saved_is_cuda = torch.Tensor.is_cuda
    saved_device = torch.cuda.device
    interpreter.InterpretedFunction.run = run
    autotuner.Autotuner.run = tuned_run
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = saved_run
        autotuner.Autotuner.run = saved_tuned
        torch.Tensor.is_cuda = saved_is_cuda
        torch.cuda.device = saved_device
        for mod, attr, val in saved:
            setattr(mod, attr, val)


# The driving matrix. Gating: ResNet-50 stage shapes at batch 1 and 16, the benchmark shapes,
# and small ragged maps; every input dtype the kernels take, both layouts, the three blocks
# (BAM with both combine rules), training (forward + backward) and inference.
GATING_SHAPES = [(1, 16, 3, 5), (2, 64, 28, 28), (1, 64, 112, 112), (8, 256, 56, 56),
                 (16, 256, 56, 56), (16, 512, 28, 28), (1, 512, 28, 28), (16, 1024, 14, 14),
                 (1, 1024, 14, 14), (16, 2048, 7, 7), (1, 2048, 7, 7), (2, 32, 224, 224)]
GATING_DTYPES = ("float32", "bfloat16", "float16", "float64")
# Attention: every head-dim bucket, token counts with and without a multiple of 16 (Triton
# specialises integer arguments on divisibility by 16), self and cross attention.
ATTN_DTYPES = ("float32", "float16", "bfloat16")
ATTN_HEAD_DIMS = (16, 32, 64, 128, 256)
ATTN_TOKENS = ((197, 197), (256, 256), (64, 197))


def _drive_gating(rec):
    """The functional forms with trivial branches (the kernels are what is recorded; the
    branches only need the right shapes), inference and training."""
    import torch
    import attnkern

    def mlp(v):
        return v * 0.5

    def spatial_cbam(s):
        return s.sum(1, keepdim=True)

    def spatial_bam(x):
        return x[:, :1].float()

    calls = [
        ("cbam", lambda x: attnkern.cbam(x, mlp, spatial_cbam)[0]),
        ("se", lambda x: attnkern.squeeze_excite(x, mlp)[0]),
        ("se-maxpool", lambda x: attnkern.squeeze_excite(x, mlp, add_maxpool=True)[0]),
        ("bam-sum", lambda x: attnkern.bam(x, mlp, spatial_bam, combine="sum")[0]),
        ("bam-product", lambda x: attnkern.bam(x, mlp, spatial_bam, combine="product")[0]),
    ]
    for dt in GATING_DTYPES:
        dtype = getattr(torch, dt)
        for shape in GATING_SHAPES:
            for cl in (False, True):
                fmt = torch.channels_last if cl else torch.contiguous_format
                for name, call in calls:
                    rec.case = f"{name} {dt} {'x'.join(map(str, shape))} {'cl' if cl else 'nchw'}"
                    x = torch.zeros(shape, dtype=dtype).contiguous(memory_format=fmt)
                    with torch.no_grad():
                        call(x)
                    x.requires_grad_(True)
                    y = call(x)
                    y.backward(torch.zeros_like(y))


def _drive_attention(rec, skipped):
    import torch
    import attnkern
    from attnkern import explain

    for dt in ATTN_DTYPES:
        dtype = getattr(torch, dt)
        for d in ATTN_HEAD_DIMS:
            for nq, nk in ATTN_TOKENS:
                for kind in ("none", "causal", "mask", "mask-grad", "bool-mask", "gqa"):
                    for det in (False, True):
                        rec.case = f"sdpa {dt} D{d} {nq}x{nk} {kind}{' deterministic' if det else ''}"
                        if kind == "causal" and nq != nk:
                            continue
                        h, hk = 4, (2 if kind == "gqa" else 4)
                        q = torch.zeros(1, h, nq, d, dtype=dtype, requires_grad=True)
                        k = torch.zeros(1, hk, nk, d, dtype=dtype, requires_grad=True)
                        v = torch.zeros(1, hk, nk, d, dtype=dtype, requires_grad=True)
                        kw = {}
                        if kind == "causal":
                            kw["is_causal"] = True
                        elif kind in ("mask", "mask-grad"):
                            kw["attn_mask"] = torch.zeros(1, 1, nq, nk, dtype=dtype,
                                                          requires_grad=kind == "mask-grad")
                        elif kind == "bool-mask":
                            kw["attn_mask"] = torch.ones(nq, nk, dtype=torch.bool)
                        elif kind == "gqa":
                            kw["enable_gqa"] = True
                        torch.use_deterministic_algorithms(det)
                        try:
                            o = attnkern.scaled_dot_product_attention(q, k, v, **kw)
                        except TypeError as e:
                            if kind == "gqa":
                                skipped.add(f"sdpa enable_gqa: {e}")
                                continue
                            raise
                        except (ValueError, RuntimeError) as e:
                            skipped.add(f"sdpa {dt} D{d} {kind}: {type(e).__name__}: {e}"[:300])
                            continue
                        finally:
                            torch.use_deterministic_algorithms(False)
                        torch.use_deterministic_algorithms(det)
                        try:
                            o.backward(torch.zeros_like(o))
                        finally:
                            torch.use_deterministic_algorithms(False)
                if nq != nk:
                    continue
                for kind in ("none", "causal", "mask"):
                    rec.case = f"maps {dt} D{d} {nq} {kind}"
                    q = torch.zeros(1, 2, nq, d, dtype=dtype)
                    k = torch.zeros(1, 2, nk, d, dtype=dtype)
                    kw = {"is_causal": True} if kind == "causal" else (
                        {"attn_mask": torch.zeros(nq, nk, dtype=dtype)} if kind == "mask" else {})
                    try:
                        explain.attention_rows(q, k, [0, nq - 1], **kw)
                        explain.attention_received(q, k, **kw)
                    except (ValueError, RuntimeError) as e:
                        skipped.add(f"maps {dt} D{d} {kind}: {type(e).__name__}: {e}"[:300])


def capture(out_path: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ATTNKERN_BACKEND"] = "triton"
    import torch

    torch.manual_seed(0)
    rec = _Recorder()
    skipped = set()
    t0 = time.time()
    with _as_on_gpu(rec):
        _drive_gating(rec)
        _drive_attention(rec, skipped)
    data = {"records": list(rec.records.values()), "launches": rec.launches,
            "skipped": sorted(skipped), "jit_functions": _jit_functions(),
            "seconds": round(time.time() - t0, 1)}
    with open(out_path, "w") as f:
        json.dump(data, f)


def _jit_functions():
    """Every @triton.jit function of attnkern.triton, and which of them other kernels call
    (so that a kernel nobody launched can be told from a helper)."""
    import importlib
    import pkgutil

    import attnkern.triton as pkg
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    fns = {}
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"attnkern.triton.{m.name}")
        for val in vars(mod).values():
            if isinstance(val, (JITFunction, InterpretedFunction)):
                fn = val.fn
                if fn.__module__ == mod.__name__:
                    import inspect
                    fns[f"{fn.__module__}:{fn.__qualname__}"] = inspect.getsource(fn)
    names = {k: k.split(":")[1] for k in fns}
    called = sorted(k for k, n in names.items()
                    if any(re.search(rf"\b{re.escape(n)}\s*\(", src) for k2, src in fns.items() if k2 != k))
    return {"all": sorted(fns), "called_by_kernels": called}


# ------------------------------------------------------------------------------------------
# step 2: compile (no interpreter)
# ------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def _decode(v, torch, tl):
    if isinstance(v, dict):
        if "tensor" in v:
            dtype = getattr(torch, v["tensor"])
            t = torch.empty(64, dtype=dtype)
            return t if v["aligned"] else t[1:]
        if "int" in v:
            return v["int"]
        if "float" in v:
            return v["float"]
        if "tl" in v:
            return getattr(tl, v["tl"]) if hasattr(tl, v["tl"]) else tl.dtype(v["tl"])
    return v


def compile_one(rec: dict, arch: int) -> dict:
    """Compile one record for sm_<arch>; returns shared memory, registers, spills, seconds and
    the error, if any."""
    import torch
    import triton
    import triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    import importlib

    # The kernel by its module and name (the records name the JITFunction's wrapped function;
    # a name bound to an autotuner or heuristics wrapper is unwrapped to its JITFunction).
    fn = importlib.import_module(rec["module"])
    for part in rec["qualname"].split("."):
        fn = getattr(fn, part)
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{rec['module']}.{rec['qualname']} is not a Triton kernel")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    args = [_decode(a, torch, tl) for a in rec["args"]]
    kwargs = {k: _decode(v, torch, tl) for k, v in rec["kwargs"].items()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    out = {"kernel": rec["qualname"], "module": rec["module"], "arch": arch,
           "constexprs": {fn.arg_names[k[0]]: str(v) for k, v in constexprs.items()
                          if len(k) == 1 and fn.params[k[0]].is_constexpr},
           "num_warps": options.num_warps, "num_stages": options.num_stages,
           "dtypes": sorted({v for v in signature.values() if isinstance(v, str) and v.startswith("*")}),
           "case": rec.get("case", ""), "roles": rec.get("roles") or ["launch"]}
    log = io.StringIO()
    t0 = time.time()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                               options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compile error is a finding
        out.update(seconds=round(time.time() - t0, 2), error=f"{type(e).__name__}: {str(e)[:2000]}")
        return out
    text = log.getvalue()
    regs = [int(x) for x in _PTXAS_REGS.findall(text)]
    spills = [(int(a), int(b)) for a, b in _PTXAS_SPILL.findall(text)]
    stack = [int(x) for x in _PTXAS_STACK.findall(text)]
    out.update(seconds=round(time.time() - t0, 2), shared=int(k.metadata.shared),
               regs=max(regs) if regs else None,
               spill_stores=sum(a for a, _ in spills) if spills else None,
               spill_loads=sum(b for _, b in spills) if spills else None,
               stack=max(stack) if stack else None, error=None)
    out["problems"] = problems(out, arch)
    return out


def problems(r: dict, arch: int) -> list:
    """Why a compiled kernel does not fit sm_<arch>: shared memory above the per-block limit,
    register spills, or no ptxas figures to tell."""
    found = []
    if r.get("regs") is None or r.get("spill_stores") is None:
        found.append("no ptxas log (registers and spills unknown)")
    if r["shared"] > SMEM_LIMIT[arch]:
        found.append(f"shared memory {r['shared']} B > {SMEM_LIMIT[arch]} B (sm_{arch})")
    if (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) > 0:
        found.append(f"register spills: {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
    return found


def must_fit(r: dict) -> bool:
    """A launch, or the fixed config a tuned launch falls back to, must fit; a config that is
    only an autotune candidate need not: on a GPU the pruner compiles it before timing it and
    drops it if it spills registers or exceeds the shared memory per block."""
    return set(r.get("roles") or ["launch"]) != {"candidate"}


def dropped_on_device(r: dict) -> bool:
    """An autotune candidate the pruner's compile check drops on the device (it compiled, and
    spills or needs too much shared memory)."""
    return (not must_fit(r) and not r.get("error") and bool(r.get("problems"))
            and all(p.startswith(("register spills", "shared memory")) for p in r["problems"]))


def failed(r: dict) -> bool:
    """A compile error, no ptxas figures, or a config that must fit and does not."""
    return bool(r.get("error") or r.get("problems")) and not dropped_on_device(r)


def _compile_worker(payload):
    rec, arch = payload
    try:
        return compile_one(rec, arch)
    except Exception as e:  # noqa: BLE001 - a failure to set up the compile is a finding too
        return {"kernel": rec["qualname"], "module": rec["module"], "arch": arch, "case": rec.get("case", ""),
                "roles": rec.get("roles") or ["launch"], "error": f"{type(e).__name__}: {str(e)[:2000]}", "problems": [], "seconds": 0.0}


def compile_records(records, archs, jobs: int):
    import concurrent.futures as cf

    work = [(r, a) for r in records for a in archs]
    if jobs <= 1:
        return [_compile_worker(w) for w in work]
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_compile_worker, work))


# ------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------

def summarize(results):
    """Per (module, kernel, arch): compiles, the range of shared memory and registers, the
    worst case, and failures."""
    groups = defaultdict(list)
    for r in results:
        groups[(r["module"].rsplit(".", 1)[-1], r["kernel"], r["arch"])].append(r)
    rows = []
    for (mod, kern, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.get("error")]
        row = {"module": mod, "kernel": kern, "arch": arch, "compiled": len(ok), "errors": len(rs) - len(ok),
               "failed": sum(1 for r in rs if failed(r)), "dropped": sum(1 for r in rs if dropped_on_device(r)),
               "seconds": round(sum(r.get("seconds", 0.0) for r in rs), 1)}
        if ok:
            big = max(ok, key=lambda r: r["shared"])
            row.update(shared_min=min(r["shared"] for r in ok), shared_max=big["shared"],
                       regs_min=min(r["regs"] or 0 for r in ok), regs_max=max(r["regs"] or 0 for r in ok),
                       spilling=sum(1 for r in ok if (r["spill_stores"] or 0) + (r["spill_loads"] or 0) > 0),
                       max_spill=max((r["spill_stores"] or 0) for r in ok),
                       biggest=_config_text(big))
        rows.append(row)
    return rows


def _config_text(r):
    keys = [k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_C", "BLOCK_HW", "BLOCK_D", "BLOCK_DV", "BLOCK") if k in r["constexprs"]]
    tile = " ".join(f"{k}={r['constexprs'][k]}" for k in keys)
    return f"{tile} w{r['num_warps']} s{r['num_stages']} {'/'.join(d.lstrip('*') for d in r['dtypes'])}".strip()


def markdown(rows, meta) -> str:
    lines = [
        "| module | kernel | arch | configs | shared KiB (min-max) | registers (min-max) | "
        "spilling configs (max bytes) | largest shared-memory config | candidates dropped on the device | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["compiled"]:
            lines.append(
                f"| {r['module']} | `{r['kernel']}` | sm_{r['arch']} | {r['compiled']} | "
                f"{r['shared_min'] / 1024:.1f}-{r['shared_max'] / 1024:.1f} | {r['regs_min']}-{r['regs_max']} | "
                f"{r['spilling']} ({r['max_spill']}) | {r['biggest']} | {r['dropped']} | {r['failed']} |")
        else:
            lines.append(f"| {r['module']} | `{r['kernel']}` | sm_{r['arch']} | 0 | - | - | - | - | 0 | {r['failed']} |")
    head = (f"{meta['records']} distinct launch configurations (captured from {meta['launches']} launches) x "
            f"{len(meta['archs'])} targets = {meta['compiles']} compiles, {meta['failed']} failed, "
            f"{meta['dropped']} autotune candidates that the pruner's compile check drops on the device; "
            f"{meta['seconds']:.0f} s of compile time ({meta['jobs']} worker(s), {meta['cpu']}); "
            f"triton {meta['triton']}, ptxas {meta['ptxas']}.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def _ptxas_version():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        v = subprocess.check_output([get_ptxas(90).path, "--version"]).decode()
        m = re.search(r"release (\S+),", v)
        return m.group(1) if m else v.strip().splitlines()[-1]
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


def _cpu_model_name() -> str:
    if ROOT not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, ROOT)
    from attnkern._cpu import cpu_model

    return cpu_model()


def run(args) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        cap = os.path.join(tmp, "records.json")
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "capture", cap], env=env, check=True, cwd=ROOT)
        with open(cap) as f:
            data = json.load(f)
        print(f"capture: {data['launches']} launches, {len(data['records'])} distinct records, "
              f"{time.time() - t0:.1f} s", flush=True)
        for s in data["skipped"]:
            print(f"capture: skipped: {s}")
        records = data["records"]
        if args.only:
            records = [r for r in records if (must_fit(r) == (args.only == "must-fit"))
                       and (not args.kernel or r["qualname"] in args.kernel)]
        elif args.kernel:
            records = [r for r in records if r["qualname"] in args.kernel]
        if not args.full:
            seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
            print(f"compile: a sample of {args.sample} records, seed {seed} "
                  f"(rerun with --seed {seed}; --full compiles all)", flush=True)
            rng = random.Random(seed)
            # Every kernel at least once (an autotuned one both as a candidate and as a config that
            # must fit), the rest at random.
            by_kernel = defaultdict(list)
            for r in records:
                by_kernel[(r["module"], r["qualname"], must_fit(r))].append(r)
            chosen = [rng.choice(rs) for _, rs in sorted(by_kernel.items())]
            ids = {id(r) for r in chosen}
            rest = [r for r in records if id(r) not in ids]
            chosen += rng.sample(rest, max(0, min(len(rest), args.sample - len(chosen))))
            records = chosen
        env_c = dict(env)
        env_c.pop("TRITON_INTERPRET", None)
        env_c["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton-cache")
        env_c["TRITON_ALWAYS_COMPILE"] = "1"  # every compile runs ptxas, whose log has the figures
        todo = os.path.join(tmp, "todo.json")
        res = os.path.join(tmp, "results.json")
        with open(todo, "w") as f:
            json.dump(records, f)
        t1 = time.time()
        cmd = [sys.executable, __file__, "compile", todo, res, "--jobs", str(args.jobs),
               "--archs", *map(str, args.archs)]
        subprocess.run(cmd, env=env_c, check=True, cwd=ROOT)
        with open(res) as f:
            results = json.load(f)
        wall = time.time() - t1
    dropped = [r for r in results if dropped_on_device(r)]
    for r in dropped:
        print(f"dropped on the device (autotune candidate) sm_{r['arch']} {r['kernel']} ({r['case']}) "
              f"{r.get('constexprs', '')} w{r.get('num_warps')} s{r.get('num_stages')}: {'; '.join(r['problems'])}")
    failed_ = [r for r in results if failed(r)]
    for r in failed_:
        print(f"FAILED sm_{r['arch']} {r['kernel']} ({r['case']}) {r.get('constexprs', '')} "
              f"w{r.get('num_warps')} s{r.get('num_stages')}: {r.get('error') or '; '.join(r['problems'])}")
    rows = summarize(results)
    meta = {"records": len(records), "launches": data["launches"], "archs": list(args.archs),
            "compiles": len(results), "failed": len(failed_), "dropped": len(dropped), "seconds": wall, "jobs": args.jobs,
            "cpu": _cpu_model_name(), "triton": __import__("triton").__version__, "ptxas": _ptxas_version()}
    table = markdown(rows, meta)
    print(table)
    print(f"compile: {len(results)} compiles in {wall:.1f} s wall", flush=True)
    uncovered = sorted(set(data["jit_functions"]["all"]) - set(data["jit_functions"]["called_by_kernels"])
                       - {f"{r['module']}:{r['qualname']}" for r in data["records"]})
    if uncovered:
        print(f"NOT LAUNCHED by the capture (extend the driving matrix): {uncovered}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"meta": meta, "rows": rows, "failed": failed_, "dropped": dropped, "skipped": data["skipped"],
                       "uncovered": uncovered, "results": results}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 1 if failed_ or uncovered else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="record the launches (internal: runs under the interpreter)")
    c.add_argument("out")
    k = sub.add_parser("compile", help="compile recorded launches (internal)")
    k.add_argument("records")
    k.add_argument("out")
    k.add_argument("--jobs", type=int, default=1)
    k.add_argument("--archs", type=int, nargs="+", default=list(ARCHS))
    r = sub.add_parser("run", help="capture, then compile for each target and report")
    r.add_argument("--full", action="store_true", help="compile every distinct record (else a sample)")
    r.add_argument("--sample", type=int, default=0,
                   help="records compiled without --full: one per kernel, plus more up to this count")
    r.add_argument("--seed", type=int, default=None, help="seed of the sample (default: random, printed)")
    r.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    r.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    r.add_argument("--only", choices=("must-fit", "candidates"),
                   help="only the records that must fit (launches, fallbacks) or only autotune candidates")
    r.add_argument("--kernel", nargs="+", help="only these kernels (names as in the table)")
    r.add_argument("--report", help="write the JSON report here")
    r.add_argument("--markdown", help="write the Markdown table here")
    a = p.parse_args(argv)
    if a.cmd == "capture":
        capture(a.out)
        return 0
    if a.cmd == "compile":
        with open(a.records) as f:
            records = json.load(f)
        results = compile_records(records, a.archs, a.jobs)
        with open(a.out, "w") as f:
            json.dump(results, f)
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
