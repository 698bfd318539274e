"""Triton kernels of the pooled-gating primitives shared by CBAM, SE and BAM: the CUDA kernels
of the ``attnkern::`` ops (registered in :mod:`attnkern.ops.gating`).

Same functions, argument orders and results as :mod:`attnkern.reference.gating` (the ground
truth) and the C++ kernels. Each primitive's kernels sit next to their launcher:

=================================  ==========================================================
``channel_stats``                  channel_stats.py: mean, max and tie count of x over H*W
``spatial_stats``,                 spatial_stats.py: mean, max and tie count over C of x*gc,
``spatial_stats_backward``         and the channel gate's gradient through them
``gate_apply``,                    gate_apply.py: x*gc*gs, the same with a residual block's add
``gate_apply_residual``,           and ReLU (out of place and in place), and the gates'
``gate_apply_residual_``,          gradients
``gate_apply_backward``
``gating_input_grad``              gating_input_grad.py: the input gradient of a CBAM or SE
                                   block, every term optional, written once
``bam_combine``,                   bam_combine.py: x*(1 + sigmoid(z)), z = mc + ms or mc * ms,
``bam_combine_backward``,          the logits' gradients, and the input gradient
``bam_input_grad``
=================================  ==========================================================

_gating_common.py holds the tiling, the checks and the design notes; _both_axes.py the pass
that reduces over C and over H*W at once (the gates' and the logits' gradients).
"""
from __future__ import annotations

from ._gating_common import (_MIN_BLOCK_C_FOR_HW_LOOP, SUPPORTED_DTYPES, _c_loop_tile, _check_x,  # noqa: F401
                             _split_plan)
from .bam_combine import bam_combine, bam_combine_backward, bam_input_grad
from .channel_stats import channel_stats
from .gate_apply import gate_apply, gate_apply_backward, gate_apply_residual, gate_apply_residual_
from .gating_input_grad import gating_input_grad
from .spatial_stats import spatial_stats, spatial_stats_backward

__all__ = [
    "SUPPORTED_DTYPES", "channel_stats", "spatial_stats", "spatial_stats_backward", "gate_apply",
    "gate_apply_residual", "gate_apply_residual_", "gate_apply_backward", "gating_input_grad", "bam_combine",
    "bam_combine_backward", "bam_input_grad",
]
