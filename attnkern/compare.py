"""Side-by-side comparison of the gating blocks: fused (attnkern) vs naive (the reference) vs
the eager module users have today (timm) vs ``torch.compile`` of it.

The benchmark suites (benchmarks/) build their variants here, and ``attnkern compare`` prints
the table of one run. Timings are medians of repeated calls measured side by side in one
process, so the ratios hold on a noisy machine even where the absolute times do not.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from .nn import BAM, CBAM, SqueezeExcite
from .reference import bam as ref_bam
from .reference import cbam as ref_cbam
from .reference import se as ref_se

OPS = ("cbam", "se", "bam")
VARIANTS = {"cbam": ("fused", "naive", "timm", "compile"), "se": ("fused", "naive", "timm", "compile"),
            "bam": ("fused", "naive", "compile")}
# reads + writes of x's size of the memory floor (the passes of the fused blocks, counted in
# benchmarks/test_bench_blocks.py): forward, backward
FLOOR_TRANSFERS = {"cbam": (4, 5), "se": (3, 5), "bam": (3, 5)}


class Naive(nn.Module):
    """A block computed by the pure-PyTorch reference with the weights of ``m``."""

    def __init__(self, op: str, m: nn.Module):
        super().__init__()
        self.op, self.m = op, m

    def forward(self, x):
        m = self.m
        if self.op == "cbam":
            return ref_cbam.cbam(x, m.channel, m.spatial, pool_order=m.pool_order)[0]
        if self.op == "se":
            return ref_se.squeeze_excite(x, m.mlp, gate=m._gate(), add_maxpool=m.add_maxpool)[0]
        return ref_bam.bam(x, m.channel, m.spatial, combine=m.combine)[0]


def make_variant(op: str, variant: str, channels: int, train: bool, seed: int = 0) -> nn.Module:
    """The ``variant`` of block ``op`` with ``channels`` channels, same weights for every variant."""
    torch.manual_seed(seed)
    if op == "bam":
        base = BAM(channels).train(train)
        eager, ours = Naive("bam", base), base
    else:
        if op == "cbam":
            from timm.layers.cbam import CbamModule

            eager = CbamModule(channels).train(train)
            ours = CBAM.from_timm(eager)
        else:
            from timm.layers.squeeze_excite import SEModule

            eager = SEModule(channels).train(train)
            ours = SqueezeExcite.from_timm(eager)
    if variant == "fused":
        return ours
    if variant == "naive":
        return Naive(op, ours)
    if variant == "timm" and op != "bam":
        return eager
    if variant == "compile":
        return torch.compile(eager)
    raise ValueError(f"unknown variant {variant!r} for {op}")


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of ``model(x)``: unique storages, parameters left
    out (autograd saves them by reference). Exact and machine-independent; activations that
    ``torch.compile`` saves are not visible here."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def step_fn(model: nn.Module, shape: Sequence[int], backward: bool) -> Callable[[], None]:
    """One forward (no_grad) or forward+backward call on fixed random inputs."""
    x = torch.randn(*shape)
    if not backward:
        def fwd():
            with torch.no_grad():
                model(x)
        return fwd
    x.requires_grad_()
    g = torch.randn(*shape)

    def fwd_bwd():
        x.grad = None
        model(x).backward(g)
    return fwd_bwd


def median_time(fn: Callable[[], None], rounds: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def compare(op: str, shape: Sequence[int], rounds: int = 7, variants: Sequence[str] = ()) -> List[Dict]:
    """Rows (op, pass, variant, ms) for every variant, plus the memory floor of the same run."""
    variants = list(variants) or list(VARIANTS[op])
    x = torch.randn(*shape)
    y = torch.empty_like(x)
    clone_s = median_time(lambda: y.copy_(x), rounds=2 * rounds)  # 1 read + 1 write, no allocation
    fw, bw = FLOOR_TRANSFERS[op]
    rows = [dict(op=op, pass_="fwd", variant="floor", ms=clone_s * 1e3 * fw / 2),
            dict(op=op, pass_="fwd+bwd", variant="floor", ms=clone_s * 1e3 * (fw + bw) / 2)]
    for backward in (False, True):
        for v in variants:
            model = make_variant(op, v, shape[1], train=backward)
            t = median_time(step_fn(model, shape, backward), rounds=rounds, warmup=3 if v == "compile" else 2)
            rows.append(dict(op=op, pass_="fwd+bwd" if backward else "fwd", variant=v, ms=t * 1e3))
    return rows


def table(rows: List[Dict], shape: Sequence[int]) -> str:
    """A markdown table: one line per pass, ms per variant, the fused speed-ups and floor ratio."""
    passes = list(dict.fromkeys(r["pass_"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "floor"]
    get = {(r["pass_"], r["variant"]): r["ms"] for r in rows}
    others = [v for v in variants if v != "fused"]
    head = ["op", "pass", "shape"] + [f"{v} ms" for v in variants] + [f"fused vs {v}" for v in others] + \
        ["floor ms", "fused / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in passes:
        f = get[(p, "fused")]
        cells = [rows[0]["op"], p, "x".join(map(str, shape))] + [f"{get[(p, v)]:.2f}" for v in variants]
        cells += [f"{get[(p, v)] / f:.2f}x" for v in others]
        cells += [f"{get[(p, 'floor')]:.2f}", f"{f / get[(p, 'floor')]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
