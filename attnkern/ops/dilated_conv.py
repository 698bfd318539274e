"""BAM's dilated convolutions as ``attnkern::`` ops of PyTorch's dispatcher: the k x k "same"
convolution with dilation d of a narrow map x [B, C, H, W] to C_out channels, with an optional
bias (its math: :mod:`attnkern.reference.dilated_conv`).

===========================  =============================================================
``dilated_conv``             ``(x [B, C, H, W], weight [C_out, C, k, k], bias [C_out] or None,
                             dilation) -> [B, C_out, H, W]``
``dilated_conv_backward``    ``(grad_out, x, weight, dilation, output_mask)
                             -> (grad_x, grad_weight, grad_bias)``, an empty tensor for each one
                             that ``output_mask`` does not ask for (ATen's
                             ``convolution_backward`` convention)
===========================  =============================================================

Where each runs:

- CPU: the C++ kernels (csrc/dilated_conv.cpp, which defines the schemas): the direct
  correlation of csrc/correlate.h. oneDNN runs BAM's 3x3 dilated convolutions at a few GMAC/s
  when the branch is a few channels wide (see that file); ``attnkern.BAM`` calls this op for
  branches up to :data:`attnkern.nn.bam.DIRECT_CONV_MAX_WIDTH` channels wide, where it is the
  faster one.
- every other device (CUDA included), or CPU when the C++ kernels are not built: the
  reference, registered as the ``CompositeExplicitAutograd`` kernel; on CUDA that is cuDNN's
  convolution, so there is no Triton kernel for it.

A fake kernel makes it traceable and an autograd formula differentiable (also under
``torch.compile``). :func:`dilated_conv` is what the BAM module calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..reference import dilated_conv as _ref
from .gating import define_ops

__all__ = ["SCHEMAS", "OPS", "dilated_conv"]

#: The schemas of the ops. The C++ file defines the same; these are used only where the C++
#: kernels are not built (a test checks that the two agree).
SCHEMAS = {
    "dilated_conv": "(Tensor x, Tensor weight, Tensor? bias, int dilation) -> Tensor",
    "dilated_conv_backward": "(Tensor grad_out, Tensor x, Tensor weight, int dilation, bool[3] output_mask) "
                             "-> (Tensor, Tensor, Tensor)",
}
OPS = tuple(SCHEMAS)

_lib = define_ops(SCHEMAS, _ref)


@torch.library.register_fake("attnkern::dilated_conv", lib=_lib)
def _(x, weight, bias, dilation):
    B, _, H, W = x.shape
    return x.new_empty((B, weight.shape[0], H, W))


@torch.library.register_fake("attnkern::dilated_conv_backward", lib=_lib)
def _(grad_out, x, weight, dilation, output_mask):
    shapes = (x.shape, weight.shape, weight.shape[:1])
    return tuple((x if i == 0 else weight).new_empty(shape if need else (0,))
                 for i, (shape, need) in enumerate(zip(shapes, output_mask)))


def _setup(ctx, inputs, output):
    x, weight, bias, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilation = dilation
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    grad_x, grad_w, grad_b = torch.ops.attnkern.dilated_conv_backward(
        grad_out, x, weight, ctx.dilation, [need_x, need_w, need_b])
    return (grad_x if need_x else None), (grad_w if need_w else None), (grad_b if need_b else None), None


torch.library.register_autograd("attnkern::dilated_conv", _backward, setup_context=_setup, lib=_lib)


def dilated_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """``conv2d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation)`` for x
    [B, C, H, W], a weight [C_out, C, k, k] (k odd) and a bias [C_out] or None, all of x's dtype:
    [B, C_out, H, W] in x's dtype, contiguous, sums in float32 (float64 for float64). On CPU
    tensors it runs the C++ kernels, also while ``torch.compile`` traces (a convolution is an
    opaque call in the compiled graph either way); elsewhere, while exporting, when
    ``ATTNKERN_BACKEND=reference`` or, while compiling, ``ATTNKERN_COMPILE=decompose``,
    ``torch.nn.functional.conv2d``. Differentiable in x, the weight and the bias. Raises
    ValueError for other shapes, dtypes or dilations."""
    name = "attnkern.dilated_conv"
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    k = weight.shape[-1] if weight.dim() == 4 else 0
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or weight.shape[2] != k or k % 2 == 0:
        raise ValueError(f"{name}: weight must be [C_out, C, k, k] with C = {x.shape[1]} (x's channels) and k odd, "
                         f"got shape {tuple(weight.shape)}")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name}: {arg} must have x's dtype {x.dtype}, got {t.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must be [C_out] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"{name}: dilation must be an int >= 1, got {dilation!r}")
    if (x.device.type == "cpu" and _backend.pick("dilated_conv", x.device) == "cpu"
            and not (torch.compiler.is_compiling() and _backend.compile_policy() == "decompose")):
        return torch.ops.attnkern.dilated_conv(x, weight, bias, dilation)
    return torch.nn.functional.conv2d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation)
