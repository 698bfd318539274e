"""``attnkern.BAM``: the Bottleneck Attention Module (Park et al., 2018) with a fused combine.

Keys: ``channel.fc1``, ``channel.bn``, ``channel.fc2`` (Linear, BatchNorm1d, Linear);
``spatial.conv_reduce``, ``spatial.bn_reduce``, ``spatial.conv_di.{i}``, ``spatial.bn_di.{i}``,
``spatial.conv_final``. :func:`bam_state_dict_from_authors` maps the authors' keys
(``channel_att.gate_c.gate_c_fc_0.weight``, ``spatial_att.gate_s.gate_s_conv_di_0.weight``, ...).
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .. import functional as AF
from ..ops.dilated_conv import dilated_conv
from ..reference.bam import COMBINES
from ._layers import check_module_input, has_hooks, plain_pointwise_conv, pointwise_conv

__all__ = ["BAM", "bam_state_dict_from_authors"]


class _ChannelBranch(nn.Module):
    def __init__(self, channels, rd, dd):
        super().__init__()
        self.fc1 = nn.Linear(channels, rd, **dd)
        self.bn = nn.BatchNorm1d(rd, **dd)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(rd, channels, **dd)

    def forward(self, v: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(v.device.type):
            v = v.to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.bn(self.fc1(v))))


# A spatial branch at most this wide runs its dilated convolutions on CPU with attnkern's direct
# kernels (attnkern.ops.dilated_conv) in the fused block, eval and training alike. oneDNN runs a
# convolution that narrow at a few GMAC/s (3x3, dilation 4, 4 channels, 32x4x112x112 NCHW maps:
# 3-9 ms forward, 34 ms backward); benchmarks/bam_direct_conv_ab.py measures the block both ways.
DIRECT_CONV_MAX_WIDTH = 8


def _direct_dilated_conv(conv: nn.Module, h: Tensor) -> bool:
    """Whether ``conv`` (a branch's dilated convolution) runs as attnkern.ops.dilated_conv on h:
    a plain "same" ``nn.Conv2d`` (square odd kernel, stride 1, one group, zero padding of
    dilation * (k // 2)) without hooks, on a CPU map of its weight's dtype at most
    :data:`DIRECT_CONV_MAX_WIDTH` channels wide."""
    if type(conv) is not nn.Conv2d or has_hooks(conv) or "forward" in conv.__dict__:
        return False
    k, d = conv.kernel_size[0], conv.dilation[0]
    return (h.device.type == "cpu" and h.dim() == 4 and h.shape[1] <= DIRECT_CONV_MAX_WIDTH
            and h.dtype == conv.weight.dtype and conv.kernel_size == (k, k) and k % 2 == 1
            and conv.dilation == (d, d) and conv.padding == (d * (k // 2),) * 2 and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


class _SpatialBranch(nn.Module):
    def __init__(self, channels, rd, dilation, num_dilated, dd):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, rd, 1, **dd)
        self.bn_reduce = nn.BatchNorm2d(rd, **dd)
        self.conv_di = nn.ModuleList(
            nn.Conv2d(rd, rd, 3, padding=dilation, dilation=dilation, **dd) for _ in range(num_dilated))
        self.bn_di = nn.ModuleList(nn.BatchNorm2d(rd, **dd) for _ in range(num_dilated))
        self.conv_final = nn.Conv2d(rd, 1, 1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        """The spatial logits [B, 1, H, W], each layer called as the authors' code calls it (what
        the reference and ``torch.compile`` run)."""
        return self.from_reduced(self.conv_reduce(x), pointwise=False)

    def from_reduced(self, h: Tensor, pointwise: bool = True) -> Tensor:
        """The logits from ``conv_reduce(x)`` on: ``attnkern.BAM`` computes that first
        convolution beside its statistics pass. ``pointwise`` (the fused block's call): the last
        1x1 convolution as a matrix product where that applies
        (:func:`attnkern.nn._layers.pointwise_conv`), and a narrow branch's dilated convolutions
        with the direct kernels (:data:`DIRECT_CONV_MAX_WIDTH`)."""
        direct = [pointwise and _direct_dilated_conv(conv, h) for conv in self.conv_di]
        if any(direct):
            # NCHW maps for the direct kernels' row reads and for the BatchNorms: ATen's
            # BatchNorm over a few channels runs several times slower on channels_last maps
            h = h.contiguous()
        h = torch.relu(self.bn_reduce(h))
        for conv, bn, use_direct in zip(self.conv_di, self.bn_di, direct):
            if use_direct:
                y = dilated_conv(h, conv.weight, conv.bias, conv.dilation[0])
            else:
                y = conv(h)
            h = torch.relu(bn(y))
        return pointwise_conv(self.conv_final, h) if pointwise else self.conv_final(h)


class BAM(nn.Module):
    """Bottleneck Attention Module: ``out = x * (1 + sigmoid(mc + ms))``.

    Args:
        channels: input channels C.
        rd_ratio, rd_channels: the branches' hidden width, ``rd_channels`` or
            ``int(channels * rd_ratio)`` (the authors' ``C // 16``).
        dilation, num_dilated: the spatial branch's dilated 3x3 convs.
        combine: ``'sum'`` (the paper) or ``'product'`` (``mc * ms``: the authors' released
            code, which their weights need).

    Non-square maps and batch 1 in eval mode work. ``keep_gates = True`` keeps the last
    forward's ``(mc, ms)`` logits in ``last_gates``.

    On CPU, outside autocast and ``torch.compile``, the block computes the spatial branch's
    first 1x1 convolution itself, as a matrix product over x, and adds its input gradient into
    dx in place (:func:`attnkern.bam`'s ``spatial_projection``): the same math, 1.5-2.6x
    ``torch.compile`` of the reference in a training step where the convolution left it at
    1.0-1.7x. A hook on ``spatial`` or ``spatial.conv_reduce`` keeps the module calls. There,
    a spatial branch at most :data:`DIRECT_CONV_MAX_WIDTH` channels wide (``channels <= 128``
    at the default ratio) also runs its dilated convolutions with attnkern's direct kernels
    (:func:`attnkern.ops.dilated_conv.dilated_conv`), whose sums and results are those of
    ``nn.Conv2d`` up to rounding; a hook on one of those convolutions keeps its module call.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        dilation: int = 4,
        num_dilated: int = 2,
        combine: str = "sum",
        rd_channels: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"attnkern.BAM: channels must be a positive int, got {channels!r}")
        if combine not in COMBINES:
            raise ValueError(f"attnkern.BAM: combine must be one of {COMBINES}, got {combine!r}")
        rd = rd_channels or max(1, int(channels * rd_ratio))
        dd = dict(device=device, dtype=dtype)
        self.channels = channels
        self.combine = combine
        self.channel = _ChannelBranch(channels, rd, dd)
        self.spatial = _SpatialBranch(channels, rd, dilation, num_dilated, dd)
        self.keep_gates = False
        self.last_gates = None

    def forward(self, x: Tensor) -> Tensor:
        check_module_input("BAM", x, self.channels, self.channel.fc1.weight)
        reduce = self.spatial.conv_reduce
        if not has_hooks(self.spatial) and plain_pointwise_conv(reduce, x):
            # the branch's first 1x1 convolution computed by the block as a matrix product over
            # x, its input gradient added into dx in place (attnkern.bam's spatial_projection)
            out, mc, ms = AF.bam(x, self.channel, self.spatial.from_reduced, combine=self.combine,
                                 spatial_projection=(reduce.weight, reduce.bias))
        else:
            out, mc, ms = AF.bam(x, self.channel, self.spatial, combine=self.combine)
        self.last_gates = (mc.detach(), ms.detach()) if self.keep_gates else None
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, combine={self.combine!r}"


_AUTHORS = [
    (r"channel_att\.gate_c\.gate_c_fc_0\.", "channel.fc1."),
    (r"channel_att\.gate_c\.gate_c_bn_1\.", "channel.bn."),
    (r"channel_att\.gate_c\.gate_c_fc_final\.", "channel.fc2."),
    (r"spatial_att\.gate_s\.gate_s_conv_reduce0\.", "spatial.conv_reduce."),
    (r"spatial_att\.gate_s\.gate_s_bn_reduce0\.", "spatial.bn_reduce."),
    (r"spatial_att\.gate_s\.gate_s_conv_di_(\d+)\.", r"spatial.conv_di.\1."),
    (r"spatial_att\.gate_s\.gate_s_bn_di_(\d+)\.", r"spatial.bn_di.\1."),
    (r"spatial_att\.gate_s\.gate_s_conv_final\.", "spatial.conv_final."),
]


def bam_state_dict_from_authors(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Map a state_dict of the BAM authors' code (any prefix, e.g. ``bam1.``) to
    ``attnkern.BAM``'s keys; other keys pass through. Load it into ``BAM(C,
    combine='product')``: their released code combines the branches by product."""
    out = {}
    for k, v in sd.items():
        nk = k
        for pat, rep in _AUTHORS:
            nk, n = re.subn(pat, rep, k)
            if n:
                break
        out[nk] = v
    return out
