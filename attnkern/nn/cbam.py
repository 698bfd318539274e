"""``attnkern.CBAM``: a drop-in for timm's ``CbamModule`` (and the CBAM authors' module) that
runs the fused kernels. Same arguments, defaults and state_dict keys as timm, so a timm
checkpoint loads with ``load_state_dict(strict=True)``::

    channel.fc1.weight, channel.fc2.weight (+ .bias with mlp_bias=True),
    spatial.conv.conv.weight, spatial.conv.bn.{weight, bias, running_mean, running_var,
    num_batches_tracked}
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as AF
from ..reference.cbam import POOL_ORDERS
from ..ops.spatial_conv import spatial_conv
from ._layers import (LayerSpec, NotConvertible, check_module_input, create_layer, has_hooks, make_divisible,
                      require_pointwise, residual_epilogue_primitives, reuse)

__all__ = ["CBAM", "cbam_state_dict_from_authors"]


class _ChannelMLP(nn.Module):
    """The shared MLP of the channel gate, as timm stores it (1x1 convs ``fc1``, ``fc2``)."""

    def __init__(self, channels, rd_channels, act_layer, gate_layer, bias, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.act = create_layer(act_layer, "act_layer", inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.gate = create_layer(gate_layer, "gate_layer")

    def forward(self, v: Tensor) -> Tensor:
        """[N, C] -> [N, C] logits (a 1x1 conv on a 1x1 map is a linear layer)."""
        w1, w2 = self.fc1.weight, self.fc2.weight
        v = v.to(w1.dtype) if not torch.is_autocast_enabled(v.device.type) else v
        h = self.act(F.linear(v, w1.flatten(1), self.fc1.bias))
        return F.linear(h, w2.flatten(1), self.fc2.bias)


class _ConvBN(nn.Module):
    def __init__(self, kernel_size, bn_momentum, bn_eps, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(1, eps=bn_eps, momentum=bn_momentum, **dd)

    def forward(self, s: Tensor) -> Tensor:
        conv = self.conv
        w = conv.weight
        s = s.to(w.dtype)
        if (type(conv) is nn.Conv2d and conv.bias is None and conv.dilation == (1, 1)
                and conv.padding_mode == "zeros" and not has_hooks(conv)):
            # the direct kernels of attnkern::spatial_conv: oneDNN runs this one-output-channel
            # convolution 3.4-13x slower on CPU (the same sums, in float32; float64 for float64)
            return self.bn(spatial_conv(s, w))
        if s.dtype == torch.float32 and s.device.type == "cpu":
            # oneDNN runs it (forward and backward) several times faster on a channels_last map;
            # its bf16/fp16 kernels in that layout lose accuracy, so only fp32
            s = s.contiguous(memory_format=torch.channels_last)
        return self.bn(conv(s))


class _SpatialBranch(nn.Module):
    def __init__(self, kernel_size, gate_layer, bn_momentum, bn_eps, device=None, dtype=None):
        super().__init__()
        self.conv = _ConvBN(kernel_size, bn_momentum, bn_eps, device=device, dtype=dtype)
        self.gate = create_layer(gate_layer, "gate_layer")

    def forward(self, s: Tensor) -> Tensor:
        return self.conv(s)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., 2018), fused.

    ``out = x * gc * gs`` with the channel gate ``gc = gate(mlp(avg_hw x) + mlp(max_hw x))`` and
    the spatial gate ``gs = gate(bn(conv_k([mean_c; max_c](x * gc))))``.

    Args (timm ``CbamModule``'s, same defaults):
        channels: input channels C.
        rd_ratio, rd_channels, rd_divisor: the MLP's hidden width, ``rd_channels`` or
            ``make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)``.
        spatial_kernel_size: k of the spatial conv (odd).
        act_layer: the MLP's activation (class, instance or name).
        gate_layer: the gate, ``'sigmoid'`` by default (any name, class or function).
        mlp_bias: biases in the MLP (the authors' code has them).
        pool_order: ``'mean_max'`` (timm) or ``'max_mean'`` (the authors' code).
        bn_momentum, bn_eps: the spatial BatchNorm's (the authors' code uses momentum 0.01).

    Set ``keep_gates = True`` to keep the last forward's gates in ``last_gates``
    (``gc`` [B, C], ``gs`` [B, 1, H, W], float32, detached) for attention maps.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 1,
        spatial_kernel_size: int = 7,
        act_layer: LayerSpec = nn.ReLU,
        gate_layer: LayerSpec = "sigmoid",
        mlp_bias: bool = False,
        pool_order: str = "mean_max",
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"attnkern.CBAM: channels must be a positive int, got {channels!r}")
        if pool_order not in POOL_ORDERS:
            raise ValueError(f"attnkern.CBAM: pool_order must be one of {POOL_ORDERS}, got {pool_order!r}")
        if spatial_kernel_size < 1 or spatial_kernel_size % 2 == 0:
            raise ValueError(f"attnkern.CBAM: spatial_kernel_size must be odd, got {spatial_kernel_size}")
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.channels = channels
        self.pool_order = pool_order
        self.channel = _ChannelMLP(channels, rd_channels, act_layer, gate_layer, mlp_bias, device, dtype)
        self.spatial = _SpatialBranch(spatial_kernel_size, gate_layer, bn_momentum, bn_eps, device, dtype)
        self.keep_gates = False
        self.last_gates = None

    def forward(self, x: Tensor) -> Tensor:
        check_module_input("CBAM", x, self.channels, self.channel.fc1.weight)
        out, gc, gs = AF.cbam(x, self.channel, self.spatial, pool_order=self.pool_order,
                              gate=self.channel.gate, spatial_gate=self.spatial.gate)
        self.last_gates = (gc.detach(), gs.detach()) if self.keep_gates else None
        return out

    def _residual_forward(self, x: Tensor, residual: Tensor, relu: bool) -> Optional[Tensor]:
        """For a residual block (attnkern.nn.resnet): ``relu?(self(x) + residual)`` with the add
        and the activation in the apply pass. Without autograd it is written into x, the
        block's own intermediate (no new big tensor); with autograd (training, attributions in
        eval mode) it is a new tensor, and their gradients come from the passes the block's
        backward makes anyway. None where that does not apply (hooks, the reference backend,
        layouts that differ): the caller then runs the unfused code."""
        from ..ops import cbam as _cbam_op

        how = residual_epilogue_primitives(self, "CBAM", "cbam", x, residual, self.channels, self.channel.fc1.weight)
        if how is None:
            return None
        primitives, in_place = how
        out, gc, gs = _cbam_op.cbam(x, self.channel, self.spatial, primitives=primitives,
                                    pool_order=self.pool_order, gate=self.channel.gate,
                                    spatial_gate=self.spatial.gate, residual=residual, relu=relu,
                                    in_place=in_place)
        self.last_gates = (gc.detach(), gs.detach()) if self.keep_gates else None
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, pool_order={self.pool_order!r}"

    @classmethod
    def from_timm(cls, m: nn.Module) -> "CBAM":
        """A CBAM computing exactly what timm's ``CbamModule`` ``m`` computes: its activation,
        gate, spatial conv and BatchNorm objects are taken over (deep copies, so every
        constructor argument is kept), with its weights, device, dtype and mode.

        Raises:
            NotConvertible: a configuration the fused kernels cannot reproduce (an MLP layer
                that is not a plain 1x1 conv, a spatial conv that changes the map's size); ``attnkern.convert`` leaves such a module
                unconverted.
        """
        ch, sp = m.channel, m.spatial
        require_pointwise("CbamModule.channel.fc1", ch.fc1)
        require_pointwise("CbamModule.channel.fc2", ch.fc2)
        conv, bn = sp.conv.conv, sp.conv.bn
        k = conv.kernel_size
        same_size = (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
                     and conv.in_channels == 2 and conv.out_channels == 1 and conv.stride == (1, 1)
                     and (conv.padding == "same" or all(2 * p == d * (kk - 1) for p, d, kk in
                                                       zip(conv.padding, conv.dilation, k))))
        if not same_size or k[0] != k[1] or k[0] % 2 == 0:
            raise NotConvertible(f"CbamModule's spatial conv {conv} is not an odd square 2->1 "
                                 "convolution that keeps the map's size")
        fc1 = ch.fc1
        new = cls(
            fc1.in_channels,
            rd_channels=fc1.out_channels,
            spatial_kernel_size=k[0],
            act_layer=reuse(ch.act),
            gate_layer=reuse(ch.gate),
            mlp_bias=fc1.bias is not None,
            device=fc1.weight.device,
            dtype=fc1.weight.dtype,
        )
        new.spatial.gate = reuse(sp.gate)
        new.spatial.conv.conv = reuse(conv)
        new.spatial.conv.bn = reuse(bn)
        new.load_state_dict(m.state_dict(), strict=True)
        new.train(m.training)
        return new


_AUTHORS_KEYS = {
    "ChannelGate.mlp.1.": "channel.fc1.",
    "ChannelGate.mlp.3.": "channel.fc2.",
    "SpatialGate.spatial.conv.": "spatial.conv.conv.",
    "SpatialGate.spatial.bn.": "spatial.conv.bn.",
}


def cbam_state_dict_from_authors(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Map a state_dict of the CBAM authors' code (``ChannelGate.mlp.1.weight``,
    ``SpatialGate.spatial.conv.weight``, ...; any prefix, e.g. ``layer1.0.cbam.``) to
    ``attnkern.CBAM``'s keys; their Linear weights become 1x1 conv weights. Keys that are not
    CBAM's pass through unchanged. Load it into ``CBAM(C, mlp_bias=True, pool_order='max_mean',
    bn_momentum=0.01)``."""
    out = {}
    for k, v in sd.items():
        nk = k
        for old, new in _AUTHORS_KEYS.items():
            if old in k:
                nk = k.replace(old, new)
                if new.startswith("channel.fc") and k.endswith("weight") and v.dim() == 2:
                    v = v.reshape(v.shape[0], v.shape[1], 1, 1)
                break
        out[nk] = v
    return out
