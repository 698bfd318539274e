"""Whole models, the way users run them: timm's CBAM-ResNet-50 and SE-ResNet-50, inference
(B16, 256 px, eval, ``torch.no_grad``) and a training step (B8, 224 px: forward, cross-entropy,
backward, SGD with momentum), NCHW and channels_last, float32 by default (other precisions on
request, below), four variants:

- ``naive``: the model as timm builds it;
- ``fused``: ``attnkern.convert`` of it;
- ``compile``: ``torch.compile`` of timm's model;
- ``fused-compile``: ``torch.compile(attnkern.convert(model))``;
- ``fused-compile-kernels`` (only when asked for, see below): the same with
  ``ATTNKERN_COMPILE=kernels``, attnkern's kernels kept as opaque ops in the compiled graph;
- ``compile-freezing``, ``fused-compile-freezing`` (only when asked for; inference only):
  ``torch.compile`` with ``torch._inductor.config.freezing = True``, inductor's inference mode
  for CPU: it takes the weights as constants, folds the BatchNorms, packs the convolution
  weights in oneDNN's layout and fuses activations and residual adds into the convolutions.

The four run interleaved in one process (round r times each variant once, in an order that
rotates every round), so machine noise falls on all of them alike; each variant's median over
the rounds is recorded with its images/s, the ratios are taken between figures of that run.
The first calls (where ``torch.compile`` compiles) are timed apart as ``first_call_s`` and
never enter a timed step. Each case starts from a reset dynamo (``torch._dynamo.reset()``) and
fails rather than fall back to eager at dynamo's recompile limit. Peak memory of a step: on CPU
the process's peak resident set during the step above its resident set before it
(``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs`` before each step; 0 where
the kernel does not allow the reset), on CUDA ``max_memory_allocated`` above the memory
allocated before.

    pytest --benchmark benchmarks/test_bench_models.py [-k cbam_resnet50-inference]
    ATTNKERN_BENCH_ROUNDS=5 (timed rounds, default 5)
    ATTNKERN_BENCH_MODEL_VARIANTS=compile,fused-compile-kernels,fused (default: the first four;
        ``naive`` is always run, every ratio being taken against it or ``compile``)
    ATTNKERN_BENCH_MODEL_PRECISIONS=float32,bfloat16,amp-bfloat16 (default: float32):
        ``bfloat16`` / ``float16`` cast the model and its input to that dtype; ``amp-bfloat16`` /
        ``amp-float16`` keep them float32 and run each step under ``torch.autocast`` to that dtype
        (logits cast to float32 for the loss).

Each (model, pass, layout) case takes minutes on a 2-core CPU (compilation included).
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F

import attnkern

timm = pytest.importorskip("timm")

MODELS = {
    "cbam_resnet50": ("resnet50", dict(block_args=dict(attn_layer="cbam"), zero_init_last=False)),
    "seresnet50": ("seresnet50", dict(zero_init_last=False)),
}
PASSES = {"inference": (16, 256), "train": (8, 224)}  # batch, image size
LAYOUTS = ("nchw", "channels_last")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = os.environ.get("ATTNKERN_BENCH_MODEL_PRECISIONS", "float32").split(",")
for _p in PRECISIONS:
    if _p.removeprefix("amp-") not in _DTYPES or _p == "amp-float32":
        raise ValueError("ATTNKERN_BENCH_MODEL_PRECISIONS: each of float32, bfloat16, float16, amp-bfloat16, "
                         f"amp-float16, got {_p!r}")
ALL_VARIANTS = ("naive", "fused", "compile", "fused-compile", "fused-compile-kernels", "compile-freezing",
                "fused-compile-freezing")
VARIANTS = tuple(dict.fromkeys(
    ["naive", "compile"] + os.environ.get("ATTNKERN_BENCH_MODEL_VARIANTS", "fused,fused-compile").split(",")))
if not set(VARIANTS) <= set(ALL_VARIANTS):
    raise ValueError(f"ATTNKERN_BENCH_MODEL_VARIANTS: each of {ALL_VARIANTS}, got {VARIANTS}")
ROUNDS = int(os.environ.get("ATTNKERN_BENCH_ROUNDS", "5"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of one step above what was in use before it, in MB."""

    def __enter__(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.ok = _reset_peak_rss()
            self.base = _rss_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.mb = (_rss_kb("VmHWM") - self.base) / 2 ** 10 if self.ok else 0.0


def _variant(base: torch.nn.Module, variant: str) -> torch.nn.Module:
    m = copy.deepcopy(base)
    if variant.startswith("fused"):
        m = attnkern.convert(m)
    if "compile" not in variant:
        return m
    if variant.endswith("-freezing"):
        # its own backend object: dynamo keys its cache on the backend, and a model of the same
        # class and shapes would otherwise reuse the graph compiled without freezing
        return torch.compile(m, options={"freezing": True})
    return torch.compile(m)


def _policy(variant: str) -> str:
    """ATTNKERN_COMPILE for a variant's calls: read while dynamo traces, and it recompiles
    when the value changes, so every call sets its own."""
    return "kernels" if variant.endswith("-kernels") else "auto"


def _step(model: torch.nn.Module, x: torch.Tensor, train: bool, amp: Optional[torch.dtype]) -> Callable[[], None]:
    def autocast():
        return torch.autocast(DEVICE, dtype=amp) if amp is not None else contextlib.nullcontext()

    if not train:
        def infer():
            with torch.no_grad(), autocast():
                model(x)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    y = torch.arange(x.shape[0], device=x.device) % 10

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
    return train_step


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pass_", list(PASSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_whole_model(benchmark, recorder, model_name, pass_, layout, precision):
    arch, kwargs = MODELS[model_name]
    amp = _DTYPES[precision[4:]] if precision.startswith("amp-") else None
    dtype = torch.float32 if amp is not None else _DTYPES[precision]
    batch, size = PASSES[pass_]
    train = pass_ == "train"
    # Every case compiles its own graphs: dynamo's recompile limit counts compiles of a code
    # object (ResNet.forward) across the whole process, and past it dynamo silently runs the
    # frame eagerly, which would time eager code as "compile". Reset, and fail if the limit is
    # hit anyway.
    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False, num_classes=10, **kwargs).to(DEVICE).train(train)
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    base, x = base.to(dtype), x.to(dtype)
    if layout == "channels_last":
        base = base.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    steps: Dict[str, Callable[[], None]] = {}
    shape = (batch, 3, size, size)
    op = f"model {model_name} {pass_} {layout}" + ("" if precision == "float32" else f" {precision}")
    policy_before = os.environ.get("ATTNKERN_COMPILE")
    for v in VARIANTS:
        if train and v.endswith("-freezing"):
            continue  # freezing applies to inference only
        step = _step(_variant(base, v).train(train), x, train, amp)

        def with_policy(step=step, policy=_policy(v), freezing=v.endswith("-freezing")):
            os.environ["ATTNKERN_COMPILE"] = policy
            # inductor reads its config when it compiles (the first call, any recompile); the
            # ``options`` above alone do not reach the freezing pass
            with torch._inductor.config.patch(freezing=freezing):
                step()
        steps[v] = with_policy
        t0 = time.perf_counter()
        steps[v]()  # torch.compile compiles here, outside the timed rounds
        _sync()
        recorder.row(op, v, pass_, shape, precision, "first_call_s", time.perf_counter() - t0, device=DEVICE)
        steps[v]()  # a second call: allocator and caches warm
        _sync()

    variants = list(steps)
    times: Dict[str, list] = {v: [] for v in variants}
    peaks: Dict[str, float] = {v: 0.0 for v in variants}
    order = list(variants)

    def one_round():
        for v in order:
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                steps[v]()
                _sync()
                times[v].append(time.perf_counter() - t0)
            peaks[v] = max(peaks[v], mem.mb)
        order.append(order.pop(0))  # rotate: no variant always runs first

    benchmark.extra_info.update(op=op, variants=",".join(variants))
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0, iterations=1)

    med = {v: statistics.median(times[v]) for v in variants}
    for v in variants:
        ts = sorted(times[v])
        recorder.row(op, v, pass_, shape, precision, "time_ms", med[v] * 1e3,
                     ts[len(ts) // 5] * 1e3, ts[(4 * len(ts)) // 5 if len(ts) > 1 else 0] * 1e3, device=DEVICE)
        recorder.row(op, v, pass_, shape, precision, "images_per_s", batch / med[v], device=DEVICE)
        recorder.row(op, v, pass_, shape, precision, "peak_mb", peaks[v], device=DEVICE)
    summary = ", ".join(f"{v} {batch / med[v]:.2f} img/s" for v in variants)
    ratios = ", ".join([f"{v}/naive {med['naive'] / med[v]:.2f}x" for v in variants if v.startswith("fused")]
                       + [f"{v}/compile {med['compile'] / med[v]:.2f}x" for v in variants if v.startswith("fused")]
                       + [f"fused/{v} {med[v] / med['fused']:.2f}x" for v in variants
                          if v.endswith("-freezing") and "fused" in med])
    if policy_before is None:
        os.environ.pop("ATTNKERN_COMPILE", None)
    else:
        os.environ["ATTNKERN_COMPILE"] = policy_before
    print(f"\n{op}: {summary}; {ratios}")
    assert all(t > 0 for ts in times.values() for t in ts)
