"""``attnkern.convert(model)``: swap the attention blocks of an existing model for attnkern's
fused modules, in place, weights copied, numbers unchanged.

Each converter is registered against the fully qualified class name of the module it replaces
(so a library that is not installed costs nothing) and builds ours with ``from_<library>``.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .cbam import CBAM

__all__ = ["convert", "register_converter", "CONVERTERS"]

CONVERTERS: Dict[str, Callable[[nn.Module], nn.Module]] = {}


def register_converter(qualname: str, fn: Callable[[nn.Module], nn.Module]) -> None:
    """Convert every module whose class is ``qualname`` (``module.Class``) with ``fn``."""
    CONVERTERS[qualname] = fn


register_converter("timm.layers.cbam.CbamModule", CBAM.from_timm)


def _qualname(m: nn.Module) -> str:
    t = type(m)
    return f"{t.__module__}.{t.__qualname__}"


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every supported attention module of ``model`` by attnkern's fused
    equivalent (weights, device, dtype and train/eval mode kept) and return the model.

    Supported: timm ``CbamModule`` -> :class:`attnkern.CBAM`. If ``model`` itself is such a
    module, the converted module is returned (there is no parent to put it in).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnkern.convert: model must be a torch.nn.Module, got {type(model).__name__}")
    fn = CONVERTERS.get(_qualname(model))
    if fn is not None:
        return fn(model)
    for name, child in list(model.named_children()):
        fn = CONVERTERS.get(_qualname(child))
        if fn is not None:
            setattr(model, name, fn(child))
        else:
            convert(child)
    return model
