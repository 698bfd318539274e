"""``attnkern.convert(model)``: swap the attention blocks of an existing model for attnkern's
fused modules, in place, weights copied, numbers unchanged.

Each converter is registered against the fully qualified class name of the module it replaces
(so a library that is not installed costs nothing) and builds ours with ``from_<library>``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from ._layers import NotConvertible

from .attention import Attention
from .cbam import CBAM
from .resnet import patch_block
from .se import SqueezeExcite, is_linear_se

__all__ = ["convert", "register_converter", "register_structural_converter", "CONVERTERS", "NotConvertible"]

CONVERTERS: Dict[str, Callable[[nn.Module], nn.Module]] = {}
STRUCTURAL: List[Tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = []


def register_converter(qualname: str, fn: Callable[[nn.Module], nn.Module]) -> None:
    """Convert every module whose class is ``qualname`` (``module.Class``) with ``fn``."""
    CONVERTERS[qualname] = fn


def register_structural_converter(match: Callable[[nn.Module], bool], fn: Callable[[nn.Module], nn.Module]) -> None:
    """Convert every module for which ``match(module)`` is true (for layers that every project
    defines under its own class name) with ``fn``."""
    STRUCTURAL.append((match, fn))


register_converter("timm.layers.cbam.CbamModule", CBAM.from_timm)
register_converter("timm.layers.attention.Attention", Attention.from_timm)
register_converter("timm.models.vision_transformer.Attention", Attention.from_timm)  # older timm
register_converter("timm.layers.squeeze_excite.SEModule", SqueezeExcite.from_timm)
register_converter("torchvision.ops.misc.SqueezeExcitation", SqueezeExcite.from_torchvision)
register_structural_converter(is_linear_se, SqueezeExcite.from_linear_se)


def _qualname(m: nn.Module) -> str:
    t = type(m)
    return f"{t.__module__}.{t.__qualname__}"


def _converter(m: nn.Module) -> Optional[Callable[[nn.Module], nn.Module]]:
    fn = CONVERTERS.get(_qualname(m))
    if fn is None and not isinstance(m, (CBAM, SqueezeExcite, Attention)):
        fn = next((f for match, f in STRUCTURAL if match(m)), None)
    return fn


def _convert_one(m: nn.Module, fn: Callable[[nn.Module], nn.Module], where: str) -> nn.Module:
    """``fn(m)``, or ``m`` itself (with a warning) when ``fn`` refuses its configuration."""
    try:
        return fn(m)
    except NotConvertible as e:
        warnings.warn(f"attnkern.convert: {where} ({_qualname(m)}) left unconverted: {e}", stacklevel=3)
        return m


def convert(model: nn.Module, *, patch_blocks: bool = True) -> nn.Module:
    """Replace, in place, every supported attention module of ``model`` by attnkern's fused
    equivalent (weights, device, dtype and train/eval mode kept) and return the model.

    Supported: timm ``CbamModule`` -> :class:`attnkern.CBAM`; timm ``SEModule``, torchvision
    ``SqueezeExcitation`` (EfficientNet, MobileNetV3, RegNet) and the common Linear-based SE
    layer (``avg_pool`` + ``fc = Sequential(Linear, act, Linear, gate)``) ->
    :class:`attnkern.SqueezeExcite`; timm ViT ``Attention`` (ViT, DeiT, ... blocks) ->
    :class:`attnkern.Attention`. If ``model`` itself is such a module, the converted module
    is returned (there is no parent to put it in).

    The converted module computes what the original did: its small layers (activations, gates,
    norms) are the original's objects, deep-copied, never rebuilt from their type. A module
    whose configuration the fused kernels cannot reproduce (e.g. an MLP layer that is not a
    plain 1x1 convolution) is left as it is, with a ``UserWarning`` that says why.

    ``patch_blocks``: also patch the residual networks it knows (timm's ResNet ``BasicBlock``
    and ``Bottleneck``, and ``ResNet`` itself, :mod:`attnkern.nn.resnet`): in eval mode each
    BatchNorm is folded into the convolution before it, no pass of its own over the
    activation; on CPU (float32, and bfloat16 or float16 where oneDNN has native kernels for
    them on this CPU) the ResNet runs its features channels_last and returns them in the
    input's layout. Submodules and ``state_dict`` keys do not change; under
    ``torch.compile`` they run timm's forward. Other block classes are left alone.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnkern.convert: model must be a torch.nn.Module, got {type(model).__name__}")
    fn = _converter(model)
    if fn is not None:
        return _convert_one(model, fn, "model")
    for name, child in list(model.named_children()):
        fn = _converter(child)
        if fn is not None:
            setattr(model, name, _convert_one(child, fn, name))
        else:
            convert(child, patch_blocks=patch_blocks)
    return patch_block(model) if patch_blocks else model
