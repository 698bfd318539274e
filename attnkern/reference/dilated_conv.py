"""Pure-PyTorch reference of BAM's dilated convolutions (Park et al., 2018, section 3, the
spatial attention branch; the authors' ``SpatialGate``): the k x k "same" convolution with
dilation d of x [B, C, H, W] to C_out channels, with an optional bias:

    out[b, o, y, x] = bias[o] + sum over c < C, i, j < k of
                      w[o, c, i, j] * x[b, c, y + d*i - p, x + d*j - p],   p = d * (k // 2)

with zeros outside the map (``torch.nn.functional.conv2d(x, w, bias, padding=p, dilation=d)``).
Sums run in float32 (float64 for float64 input); outputs have x's dtype.

Depends on nothing but torch.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .gating import acc_dtype

__all__ = ["dilated_conv", "dilated_conv_backward"]


def dilated_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> Tensor:
    """x [B, C, H, W], a weight [C_out, C, k, k] (k odd) and a bias [C_out] or None, all of x's
    dtype -> [B, C_out, H, W]."""
    a = acc_dtype(x.dtype)
    p = dilation * (weight.shape[-1] // 2)
    out = torch.nn.functional.conv2d(x.to(a), weight.to(a), None if bias is None else bias.to(a), padding=p,
                                     dilation=dilation)
    return out.to(x.dtype).contiguous()


def dilated_conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, dilation: int,
                          output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of x ([B, C, H, W]), of the weight ([C_out, C, k, k]) and of the bias
    ([C_out]), in their dtypes, from grad_out [B, C_out, H, W]; an empty tensor for each one that
    ``output_mask`` does not ask for."""
    a = acc_dtype(x.dtype)
    p = dilation * (weight.shape[-1] // 2)
    grads = torch.ops.aten.convolution_backward(
        grad_out.to(a), x.to(a), weight.to(a), [weight.shape[0]], [1, 1], [p, p], [dilation, dilation], False,
        [0, 0], 1, list(output_mask))
    dtypes = (x.dtype, weight.dtype, weight.dtype)
    return tuple(g.to(t).contiguous() if need else x.new_empty((0,), dtype=t)
                 for g, need, t in zip(grads, output_mask, dtypes))
