"""CBAM, SE and BAM: fused (attnkern) vs naive (the reference) vs the eager module users have
(timm; for BAM the reference is that module) vs torch.compile of it, interleaved in one run
(``gating_bench.block_case``), at five shapes, NCHW and channels_last, fp32. CBAM is timed in
eval and train mode under ``torch.no_grad`` and ``torch.inference_mode``, and in a training
step (forward+backward); SE and BAM in eval/``no_grad`` and in a training step.

``pytest --benchmark benchmarks/test_bench_blocks.py -k cbam``; ``python benchmarks/report.py``
writes RESULTS.md. ``ATTNKERN_BENCH_ROUNDS`` sets the timed rounds (default 7). Memory floors
(reads + writes of x's size, attnkern.compare.FLOOR_TRANSFERS): CBAM forward 3R+1W, backward
4R+1W (the fused backward does 5R+1W: spatial_stats_backward needs the spatial branch's
gradient, which needs gate_apply_backward's); SE and BAM forward 2R+1W, backward 2R (pass A) +
2R+1W (dx). BAM's spatial convs are PyTorch's in every variant; on CPU the fused BAM computes
the first, 1x1, as a matrix product over x and adds its input gradient into dx in place
(``attnkern.bam``'s ``spatial_projection``).

Every variant runs with the C library's malloc as a user has it (glibc's maps large blocks on
allocation and unmaps them on free), so PyTorch's fresh x-sized tensors, inductor's included,
are faulted in page by page; the fused kernels' x-sized outputs come from their own cache of
freed blocks (csrc/output_cache.cpp, ``ATTNKERN_CPU_OUTPUT_CACHE_MB``), as they do for users.
"""
from __future__ import annotations

import pytest

from attnkern.compare import OPS, VARIANTS, make_variant
from gating_bench import LAYOUTS, PASSES_OF, SHAPE_IDS, SHAPES, block_case, saved_bytes

CASES = [(op, p) for op in OPS for p in PASSES_OF[op]]
CASE_IDS = [f"{op}-{p.replace(' ', '_')}" for op, p in CASES]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op,pass_", CASES, ids=CASE_IDS)
def test_block(benchmark, recorder, op, pass_, shape, layout):
    med = block_case(benchmark, recorder, op, shape, layout, pass_)
    assert all(t > 0 for t in med.values())


@pytest.mark.parametrize("op,variant", [(op, v) for op in OPS for v in VARIANTS[op] if v != "compile"],
                         ids=[f"{op}-{v}" for op in OPS for v in VARIANTS[op] if v != "compile"])
def test_saved_for_backward_bytes(recorder, op, variant):
    saved_bytes(recorder, op, variant, make_variant(op, variant, SHAPES[0][1], train=True), SHAPES[0])
