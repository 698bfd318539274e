"""``attnkern.SqueezeExcite``: a drop-in for timm's ``SEModule``, torchvision's
``SqueezeExcitation`` and the common Linear-based SE layer, running the fused kernels.

State_dict keys are those of the module replaced:
- timm ``SEModule`` / torchvision ``SqueezeExcitation``: ``fc1.weight``, ``fc1.bias``,
  (``bn.*`` with a norm layer), ``fc2.weight``, ``fc2.bias``;
- the Linear-based layer (``layout='linear'``): ``fc.0.weight``, ``fc.2.weight``.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as AF
from ._layers import (LayerSpec, NotConvertible, check_module_input, create_layer, make_divisible, require_pointwise,
                      residual_epilogue_primitives, reuse)

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2017), fused: ``x * gate(fc2(act(bn(fc1(mean_hw x)))))``.

    Args (timm ``SEModule``'s, same defaults):
        channels: input channels C.
        rd_ratio, rd_channels, rd_divisor: the hidden width, ``rd_channels`` or
            ``make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)`` (a multiple of 8
            by default, as timm rounds it).
        add_maxpool: pool with ``0.5 * mean + 0.5 * max``.
        bias: biases in the two 1x1 convs.
        act_layer, norm_layer, gate_layer: the hidden activation, an optional norm after
            ``fc1`` (e.g. ``nn.BatchNorm2d``), the gate (``'sigmoid'``, ``'hard_sigmoid'``, a
            class, an instance or a function). Every gate runs fused: it acts on [B, C] only.
        layout: ``'conv'`` (timm/torchvision keys) or ``'linear'`` (``fc`` =
            ``Sequential(Linear, act, Linear, gate)``, the common Linear-based SE layer).
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 8,
        add_maxpool: bool = False,
        bias: bool = True,
        act_layer: LayerSpec = nn.ReLU,
        norm_layer: Optional[Type[nn.Module]] = None,
        gate_layer: LayerSpec = "sigmoid",
        layout: str = "conv",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"attnkern.SqueezeExcite: channels must be a positive int, got {channels!r}")
        if layout not in ("conv", "linear"):
            raise ValueError(f"attnkern.SqueezeExcite: layout must be 'conv' or 'linear', got {layout!r}")
        if layout == "linear" and norm_layer is not None:
            raise ValueError("attnkern.SqueezeExcite: layout='linear' has no norm layer")
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        dd = dict(device=device, dtype=dtype)
        self.channels = channels
        self.add_maxpool = add_maxpool
        self.layout = layout
        act = create_layer(act_layer, "act_layer", inplace=True)
        gate = create_layer(gate_layer, "gate_layer")
        if layout == "conv":
            self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
            self.bn = norm_layer(rd_channels, **dd) if norm_layer else nn.Identity()
            self.act = act
            self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
            self.gate = gate
        else:
            self.fc = nn.Sequential(nn.Linear(channels, rd_channels, bias=bias, **dd), act,
                                    nn.Linear(rd_channels, channels, bias=bias, **dd), gate)
        self.keep_gates = False
        self.last_gates = None

    def _weights(self):
        if self.layout == "conv":
            return self.fc1, self.fc2
        return self.fc[0], self.fc[2]

    def _gate(self) -> nn.Module:
        return self.gate if self.layout == "conv" else self.fc[3]

    def mlp(self, v: Tensor) -> Tensor:
        """[B, C] pooled vector -> [B, C] gate logits."""
        l1, l2 = self._weights()
        if not torch.is_autocast_enabled(v.device.type):
            v = v.to(l1.weight.dtype)
        h = F.linear(v, l1.weight.flatten(1), l1.bias)
        if self.layout == "conv" and not isinstance(self.bn, nn.Identity):
            h = self.bn(h[:, :, None, None]).flatten(1)
        h = (self.act if self.layout == "conv" else self.fc[1])(h)
        return F.linear(h, l2.weight.flatten(1), l2.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_module_input("SqueezeExcite", x, self.channels, self._weights()[0].weight)
        out, gc = AF.squeeze_excite(x, self.mlp, gate=self._gate(), add_maxpool=self.add_maxpool)
        self.last_gates = gc.detach() if self.keep_gates else None
        return out

    def _residual_forward(self, x: Tensor, residual: Tensor, relu: bool) -> Optional[Tensor]:
        """For a residual block: as :meth:`attnkern.CBAM._residual_forward`."""
        from ..ops import se as _se_op

        how = residual_epilogue_primitives(self, "SqueezeExcite", "squeeze_excite", x, residual, self.channels,
                                           self._weights()[0].weight)
        if how is None:
            return None
        primitives, in_place = how
        out, gc = _se_op.squeeze_excite(x, self.mlp, primitives=primitives, gate=self._gate(),
                                        add_maxpool=self.add_maxpool, residual=residual, relu=relu,
                                        in_place=in_place)
        self.last_gates = gc.detach() if self.keep_gates else None
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, layout={self.layout!r}, add_maxpool={self.add_maxpool}"

    def _finish(self, m: nn.Module) -> "SqueezeExcite":
        ref = next(m.parameters())
        self.to(device=ref.device, dtype=ref.dtype)
        self.load_state_dict(m.state_dict(), strict=True)
        self.train(m.training)
        return self

    @classmethod
    def from_timm(cls, m: nn.Module) -> "SqueezeExcite":
        """From timm's ``SEModule``: its activation, norm and gate objects taken over (deep
        copies, every constructor argument kept), with its weights, device, dtype and mode.

        Raises:
            NotConvertible: ``fc1``/``fc2`` are not plain 1x1 convolutions (``attnkern.convert``
                then leaves the module unconverted).
        """
        require_pointwise("SEModule.fc1", m.fc1)
        require_pointwise("SEModule.fc2", m.fc2)
        new = cls(m.fc1.in_channels, rd_channels=m.fc1.out_channels, add_maxpool=m.add_maxpool,
                  bias=m.fc1.bias is not None, act_layer=reuse(m.act), gate_layer=reuse(m.gate))
        new.bn = reuse(m.bn)
        return new._finish(m)

    @classmethod
    def from_torchvision(cls, m: nn.Module) -> "SqueezeExcite":
        """From torchvision's ``SqueezeExcitation`` (EfficientNet, MobileNetV3, RegNet): its
        ``activation`` and ``scale_activation`` objects taken over (deep copies).

        Raises:
            NotConvertible: the pooling is not a global average or ``fc1``/``fc2`` are not
                plain 1x1 convolutions.
        """
        pool = getattr(m, "avgpool", None)
        if not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
            raise NotConvertible(f"SqueezeExcitation.avgpool is {pool}, not AdaptiveAvgPool2d(1)")
        require_pointwise("SqueezeExcitation.fc1", m.fc1)
        require_pointwise("SqueezeExcitation.fc2", m.fc2)
        new = cls(m.fc1.in_channels, rd_channels=m.fc1.out_channels, bias=m.fc1.bias is not None,
                  act_layer=reuse(m.activation), gate_layer=reuse(m.scale_activation))
        return new._finish(m)

    @classmethod
    def from_linear_se(cls, m: nn.Module) -> "SqueezeExcite":
        """From the common Linear-based SE layer: ``avg_pool`` + ``fc = Sequential(Linear, act,
        Linear, gate)``; keys ``fc.0.weight``, ``fc.2.weight`` kept, the activation and gate
        objects taken over (deep copies).

        Raises:
            NotConvertible: the Linear layers are subclasses with their own forward.
        """
        l1, act, l2, gate = m.fc
        require_pointwise("fc.0", l1)
        require_pointwise("fc.2", l2)
        new = cls(l1.in_features, rd_channels=l1.out_features, bias=l1.bias is not None,
                  act_layer=reuse(act), gate_layer=reuse(gate), layout="linear")
        return new._finish(m)


def is_linear_se(m: nn.Module) -> bool:
    """The common Linear-based SE layer: an ``AdaptiveAvgPool2d(1)`` child and
    ``fc = Sequential(Linear, activation, Linear, gate)`` with nothing else holding weights."""
    fc = getattr(m, "fc", None)
    pool = [c for c in m.children() if isinstance(c, nn.AdaptiveAvgPool2d)]
    if not isinstance(fc, nn.Sequential) or len(fc) != 4 or len(pool) != 1:
        return False
    if pool[0].output_size not in (1, (1, 1)):
        return False
    l1, act, l2, gate = fc
    if not (isinstance(l1, nn.Linear) and isinstance(l2, nn.Linear)):
        return False
    if l1.in_features != l2.out_features or l1.out_features != l2.in_features:
        return False
    if any(True for _ in act.parameters()) or any(True for _ in gate.parameters()):
        return False
    names = {n.split(".")[0] for n, _ in m.named_parameters()}
    return names == {"fc"}
