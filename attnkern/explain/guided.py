"""Guided Backpropagation (Springenberg, Dosovitskiy, Brox and Riedmiller, "Striving for
Simplicity: The All Convolutional Net", ICLR 2015 workshop) and Guided Grad-CAM (Selvaraju et
al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV
2017), on the grad-cam package's implementation.

Guided Backpropagation is the gradient of a class score with respect to the input pixels in
which every ReLU passes back only positive gradients at positive inputs: at a ReLU with input
z and incoming gradient g, ``g * (z > 0) * (g > 0)`` instead of ``g * (z > 0)``. The package's
``GuidedBackpropReLU`` autograd function is that rule; here it replaces every ``nn.ReLU``
module of a copy of the model (the caller's model, its ``inplace`` flags and its parameters'
``.grad`` stay untouched), and the whole batch runs in one backward with one target per image
(the package's ``GuidedBackpropReLUModel`` takes one image, picks the argmax of the whole
batch's output and leaves the model's ReLUs replaced by non-inplace ones).

Guided Grad-CAM is the guided gradient times Grad-CAM (the package's ``GradCAM``: ReLU of the
gradient-weighted feature maps, scaled to [0, 1] and resized to the input).

Supported models: those whose rectifiers are ``nn.ReLU`` modules (inplace or not), e.g. timm's
and torchvision's ResNets, SE- and CBAM-ResNets; sigmoid gates and other elementwise functions
keep their ordinary gradient, as in the method's definition. A model with another rectifier
module (SiLU/Swish, GELU, Mish, Hardswish, ReLU6, LeakyReLU, ELU, ...) is refused with a
``ValueError``: the guided rule is defined for ReLU only. A ReLU called as a function in a
``forward`` (``F.relu``) cannot be seen from the modules and keeps its ordinary gradient.
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

_OTHER_RECTIFIERS = {"silu", "swish", "gelu", "gelutanh", "quickgelu", "mish", "hardswish", "hardmish", "relu6",
                     "leakyrelu", "elu", "celu", "selu", "prelu", "softplus", "hardtanh", "rrelu", "relusquared"}


class GuidedResult(NamedTuple):
    """``guided`` [B, C, H, W]: guided-backpropagation gradients of each image's target score
    with respect to its pixels (the input's dtype); ``target`` [B] int64; ``logits`` [B,
    classes]; for :func:`guided_gradcam` also ``gradcam`` [B, H, W] (float32, in [0, 1]) and
    ``guided_gradcam`` [B, C, H, W] = ``guided * gradcam`` (None for :func:`guided_backprop`)."""
    guided: torch.Tensor
    target: torch.Tensor
    logits: torch.Tensor
    gradcam: Optional[torch.Tensor] = None
    guided_gradcam: Optional[torch.Tensor] = None


def check_guided_support(model: nn.Module, name: str = "attnkern.explain.guided_backprop") -> None:
    """``ValueError`` if ``model`` has a rectifier module other than ``nn.ReLU``, or no ReLU."""
    others = [(n, type(m).__name__) for n, m in model.named_modules()
              if type(m).__name__.lower().replace("_", "") in _OTHER_RECTIFIERS]
    if others:
        listed = ", ".join(f"{n} ({t})" for n, t in others[:4]) + (" ..." if len(others) > 4 else "")
        raise ValueError(f"{name}: guided backpropagation is defined for ReLU networks; "
                         f"{type(model).__name__} has other activations: {listed}")
    if not any(isinstance(m, nn.ReLU) for m in model.modules()):
        raise ValueError(f"{name}: {type(model).__name__} has no nn.ReLU module to guide")


def _targets(logits: torch.Tensor, target, name: str) -> torch.Tensor:
    B, classes = logits.shape
    if target is None:
        return logits.detach().argmax(1)
    if isinstance(target, int) and not isinstance(target, bool):
        if not -classes <= target < classes:
            raise IndexError(f"{name}: target {target} is out of range for {classes} classes")
        return torch.full((B,), target % classes, dtype=torch.long, device=logits.device)
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.shape == (B,):
        t = target.to(logits.device, torch.long)
        if bool(((t < 0) | (t >= classes)).any()):
            raise IndexError(f"{name}: target holds a class outside 0 .. {classes - 1}")
        return t
    raise TypeError(f"{name}: target must be None, an int or an integer tensor [B], got {type(target).__name__}")


def _guided_copy(model: nn.Module) -> nn.Module:
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUasModule
    from pytorch_grad_cam.utils.find_layers import replace_all_layer_type_recursive

    guided = copy.deepcopy(model).eval()
    replace_all_layer_type_recursive(guided, nn.ReLU, GuidedBackpropReLUasModule())
    return guided


def guided_backprop(model: nn.Module, x: torch.Tensor, target: Union[None, int, torch.Tensor] = None) -> GuidedResult:
    """Guided Backpropagation of each image's ``target`` score (None: its predicted class; an
    int; or an integer tensor [B]) for the batch ``x`` (any shape the model takes, images [B,
    C, H, W] typically), in one forward and one backward of an eval-mode copy of ``model``.
    Errors: ``ValueError`` for an unsupported model (see the module docstring), ``IndexError``
    / ``TypeError`` for a bad target. Needs the grad-cam package."""
    name = "attnkern.explain.guided_backprop"
    check_guided_support(model, name)
    guided = _guided_copy(model)
    xin = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = guided(xin)
        t = _targets(logits, target, name)
        (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xin)
    return GuidedResult(grad, t, logits.detach())


def guided_gradcam(model: nn.Module, x: torch.Tensor, target: Union[None, int, torch.Tensor] = None,
                   layer: Union[None, str, nn.Module] = None) -> GuidedResult:
    """Guided Grad-CAM of images ``x`` [B, C, H, W]: :func:`guided_backprop` times the package's
    Grad-CAM of ``layer`` (a module of ``model`` or its name; None: the last feature maps of a
    global-average-pooling + linear head, as :func:`attnkern.explain.cam` finds them), both for
    the same target per image. Returns a :class:`GuidedResult` with ``gradcam`` and
    ``guided_gradcam`` set. Runs on copies: ``model`` is left as it was."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    name = "attnkern.explain.guided_gradcam"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: x must be a 4-D tensor [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_guided_support(model, name)
    if layer is None:
        from .cam import find_gap_linear_head

        try:
            layer = find_gap_linear_head(model)[0]
        except ValueError as e:
            raise ValueError(f"{name}: give layer= (the feature layer for Grad-CAM); {e}") from None
    if isinstance(layer, nn.Module):
        names = [n for n, m in model.named_modules() if m is layer]
        if not names:
            raise ValueError(f"{name}: layer is not a module of the model")
        layer = names[0]
    plain = copy.deepcopy(model).eval()
    try:
        target_layer = plain.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"{name}: the model has no module {layer!r}") from None
    with torch.no_grad():
        t = _targets(plain(x), target, name)
    with GradCAM(model=plain, target_layers=[target_layer]) as gc:
        g = gc(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t.tolist()])  # [B, H, W] in [0, 1]
    gradcam = torch.from_numpy(g).to(x.device)
    res = guided_backprop(model, x, t)
    product = res.guided * gradcam[:, None].to(res.guided.dtype)
    return GuidedResult(res.guided, t, res.logits, gradcam, product)


def to_image(g: torch.Tensor) -> torch.Tensor:
    """A gradient image [C, H, W] as displayable uint8 [H, W, C]: centred at 0.5 with 0.1 per
    standard deviation, clipped (the usual display of guided backpropagation)."""
    g = g.detach().double()
    g = (g - g.mean()) / (g.std() + 1e-12) * 0.1 + 0.5
    return (g.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()
