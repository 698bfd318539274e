"""CBAM's spatial-attention convolution as ``attnkern::`` ops of PyTorch's dispatcher: the k x k
"same" convolution of the two channel-pooled maps [B, 2, H, W] to one channel, no bias (its
math: :mod:`attnkern.reference.spatial_conv`).

==========================  ==============================================================
``spatial_conv``            ``(s [B, 2, H, W], weight [1, 2, k, k]) -> [B, 1, H, W]``
``spatial_conv_backward``   ``(grad_out, s, weight, need_grad_s, need_grad_weight)
                            -> (grad_s, grad_weight)``, an empty tensor for one not asked for
==========================  ==============================================================

Where each runs:

- CPU: the C++ kernels (csrc/spatial_conv.cpp, which defines the schemas). oneDNN runs this
  convolution, with its single output channel, at a few percent of the CPU's multiply-add
  rate (see that file); the direct kernels run it 3.4-13x faster (benchmarks/spatial_conv_ab.py).
- every other device (CUDA included), or CPU when the C++ kernels are not built: the
  reference, registered as the ``CompositeExplicitAutograd`` kernel; on CUDA that is cuDNN's
  convolution, which has no such weakness, so there is no Triton kernel for it.

A fake kernel makes it traceable and an autograd formula differentiable (also under
``torch.compile``). :func:`spatial_conv` is what the CBAM module calls.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ..reference import spatial_conv as _ref
from .gating import define_ops

__all__ = ["SCHEMAS", "OPS", "spatial_conv"]

#: The schemas of the ops. The C++ file defines the same; these are used only where the C++
#: kernels are not built (a test checks that the two agree).
SCHEMAS = {
    "spatial_conv": "(Tensor s, Tensor weight) -> Tensor",
    "spatial_conv_backward": "(Tensor grad_out, Tensor s, Tensor weight, bool need_grad_s, "
                             "bool need_grad_weight) -> (Tensor, Tensor)",
}
OPS = tuple(SCHEMAS)

_lib = define_ops(SCHEMAS, _ref)


@torch.library.register_fake("attnkern::spatial_conv", lib=_lib)
def _(s, weight):
    B, _, H, W = s.shape
    return s.new_empty((B, 1, H, W))


@torch.library.register_fake("attnkern::spatial_conv_backward", lib=_lib)
def _(grad_out, s, weight, need_grad_s, need_grad_weight):
    return (s.new_empty(s.shape if need_grad_s else (0,)),
            weight.new_empty(weight.shape if need_grad_weight else (0,)))


def _setup(ctx, inputs, output):
    s, weight = inputs
    ctx.save_for_backward(s, weight)


def _backward(ctx, grad_out):
    s, weight = ctx.saved_tensors
    need_s, need_w = ctx.needs_input_grad
    grad_s, grad_w = torch.ops.attnkern.spatial_conv_backward(grad_out, s, weight, need_s, need_w)
    return (grad_s if need_s else None), (grad_w if need_w else None)


torch.library.register_autograd("attnkern::spatial_conv", _backward, setup_context=_setup, lib=_lib)


def spatial_conv(s: Tensor, weight: Tensor) -> Tensor:
    """``conv2d(s, weight, padding=k // 2)`` for the pooled maps s [B, 2, H, W] and a weight
    [1, 2, k, k] (k odd) of s's dtype: [B, 1, H, W] in s's dtype, sums in float32 (float64 for
    float64). On CPU tensors it runs the C++ kernels, also while ``torch.compile`` traces
    (a convolution is an opaque call in the compiled graph either way, so the compiler loses
    no fusion); elsewhere, while exporting, when ``ATTNKERN_BACKEND=reference`` or, while
    compiling, ``ATTNKERN_COMPILE=decompose``, ``torch.nn.functional.conv2d``. Differentiable
    in both inputs. Raises ValueError for other shapes or dtypes."""
    if s.dim() != 4 or s.shape[1] != 2:
        raise ValueError(f"attnkern.spatial_conv: s must be [B, 2, H, W] (the two pooled maps), got {tuple(s.shape)}")
    k = weight.shape[-1] if weight.dim() == 4 else 0
    if weight.dim() != 4 or tuple(weight.shape[:3]) != (1, 2, k) or k % 2 == 0:
        raise ValueError(f"attnkern.spatial_conv: weight must be [1, 2, k, k] with k odd, got {tuple(weight.shape)}")
    if s.dtype != weight.dtype:
        raise ValueError(f"attnkern.spatial_conv: weight must have s's dtype {s.dtype}, got {weight.dtype}")
    if (s.device.type == "cpu" and _backend.pick("spatial_conv", s.device) == "cpu"
            and not (torch.compiler.is_compiling() and _backend.compile_policy() == "decompose")):
        return torch.ops.attnkern.spatial_conv(s, weight)
    return torch.nn.functional.conv2d(s, weight, padding=k // 2)
