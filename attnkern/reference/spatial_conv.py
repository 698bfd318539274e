"""Pure-PyTorch reference of CBAM's spatial-attention convolution (Woo et al., 2018, eq. 3):
the k x k "same" convolution, no bias, of the two channel-pooled maps ``s = [mean_c; max_c]``
([B, 2, H, W]) to one channel:

    out[b, 0, y, x] = sum over c < 2, i, j < k of  w[0, c, i, j] * s[b, c, y + i - k//2, x + j - k//2]

with zeros outside the map (``torch.nn.functional.conv2d(s, w, padding=k // 2)``, the
convolution of timm's ``SpatialAttn`` and the authors' ``SpatialGate``). Sums run in float32
(float64 for float64 input); outputs have s's dtype.

Depends on nothing but torch.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .gating import acc_dtype

__all__ = ["spatial_conv", "spatial_conv_backward"]


def spatial_conv(s: Tensor, weight: Tensor) -> Tensor:
    """[B, 2, H, W] maps and a [1, 2, k, k] weight (k odd, s's dtype) -> [B, 1, H, W]."""
    a = acc_dtype(s.dtype)
    k = weight.shape[-1]
    out = torch.nn.functional.conv2d(s.to(a), weight.to(a), padding=k // 2)
    return out.to(s.dtype).contiguous()


def spatial_conv_backward(grad_out: Tensor, s: Tensor, weight: Tensor, need_grad_s: bool,
                          need_grad_weight: bool) -> Tuple[Tensor, Tensor]:
    """The gradients of s ([B, 2, H, W]) and of the weight ([1, 2, k, k]), in their dtypes, from
    grad_out [B, 1, H, W]; an empty tensor for one not asked for."""
    a = acc_dtype(s.dtype)
    k = weight.shape[-1]
    g, sa, wa = grad_out.to(a), s.to(a), weight.to(a)
    grad_s = grad_w = None
    if need_grad_s:
        grad_s = torch.nn.grad.conv2d_input(s.shape, wa, g, padding=k // 2).to(s.dtype).contiguous()
    if need_grad_weight:
        grad_w = torch.nn.grad.conv2d_weight(sa, weight.shape, g, padding=k // 2).to(weight.dtype).contiguous()
    empty = s.new_empty((0,))
    return (grad_s if grad_s is not None else empty,
            grad_w if grad_w is not None else weight.new_empty((0,)))
