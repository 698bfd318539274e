"""Class activation maps (CAM; Zhou, Khosla, Lapedriza, Oliva and Torralba, "Learning Deep
Features for Discriminative Localization", CVPR 2016), computed inside the forward pass.

For a network that ends in global average pooling (GAP) and one linear classifier,

    logit_c = b_c + sum_k W[c, k] * mean_{x, y} A_k(x, y) = b_c + mean_{x, y} M_c(x, y),
    M_c(x, y) = sum_k W[c, k] * A_k(x, y),

where A [K, h, w] are the last feature maps (the input of the pooling) and W [classes, K] the
classifier's weights; M_c is the class activation map of class c. It needs the feature maps
the forward pass computes anyway and one small product with W: no backward, no second pass.
Grad-CAM (Selvaraju et al. 2017) of the same layer is M_c / (h * w) for such a network (the
gradient of logit_c with respect to A_k(x, y) is W[c, k] / (h * w) everywhere).

Only global average pooling followed directly by one ``nn.Linear`` has this identity; other
heads (max or avg+max pooling, a conv or a norm after the pooling, an MLP, a ViT's token
pooling) are refused with a ``ValueError``.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn


class CamResult(NamedTuple):
    """``maps`` [B, h, w] (float32, float64 for float64 features): the class activation map of
    ``target`` [B] (int64 class index per image) on the feature maps that ``layer`` (a module
    name of the model) produced; ``logits`` [B, classes]: the model's output."""
    maps: torch.Tensor
    target: torch.Tensor
    layer: str
    logits: torch.Tensor


def _is_global_avg_pool(m: nn.Module) -> bool:
    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = m.output_size
        return size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1))
    if type(m).__name__ == "SelectAdaptivePool2d":  # timm's global pooling (also in ClassifierHead)
        inner = getattr(m, "pool", None)
        if isinstance(inner, nn.AdaptiveAvgPool2d):
            return _is_global_avg_pool(inner)
        return type(inner).__name__ == "FastAdaptiveAvgPool" and tuple(getattr(inner, "dim", (2, 3))) == (2, 3)
    return False


def _pool_description(m: nn.Module) -> str:
    if type(m).__name__ == "SelectAdaptivePool2d":
        return f"timm SelectAdaptivePool2d(pool_type={m.pool_type!r})"
    return repr(m)


def find_gap_linear_head(model: nn.Module) -> Tuple[str, str, str]:
    """Names of (feature layer, pooling, classifier) of a model that ends in global average
    pooling and one linear layer: timm models (``global_pool`` + ``fc``/``classifier``, or a
    ``ClassifierHead`` holding both) and torchvision's (``avgpool`` + ``fc``, or a
    ``classifier`` of dropout + linear). The feature layer is the module run just before the
    pooling (its output is the pooling's input). Raises ``ValueError`` for any other head."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnkern.explain.cam: model must be a torch.nn.Module, got {type(model).__name__}")
    mods = list(model.named_modules())
    pools = [(i, n) for i, (n, m) in enumerate(mods)
             if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or type(m).__name__ == "SelectAdaptivePool2d"]
    # the pooling modules nested in a SelectAdaptivePool2d are part of it
    pools = [(i, n) for i, n in pools if not any(n.startswith(p + ".") for _, p in pools if p != n)]
    if not pools:
        raise ValueError("attnkern.explain.cam: CAM needs a model that ends in global average pooling and one "
                         f"linear layer; {type(model).__name__} has no global pooling module")
    ip, pool_name = pools[-1]
    pool = mods[ip][1]
    if not _is_global_avg_pool(pool):
        raise ValueError(f"attnkern.explain.cam: CAM needs global average pooling before the classifier; "
                         f"{type(model).__name__}'s head pools with {_pool_description(pool)}")
    after = [(n, m) for n, m in mods[ip + 1:] if not n.startswith(pool_name + ".") and len(list(m.children())) == 0]
    linears = [(n, m) for n, m in after if isinstance(m, nn.Linear)]
    other = [n for n, m in after if not isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Flatten))]
    if len(linears) != 1 or other:
        found = ", ".join(f"{n} ({type(m).__name__})" for n, m in after) or "nothing"
        raise ValueError(f"attnkern.explain.cam: CAM needs one linear layer right after the global average "
                         f"pooling; {type(model).__name__} has after {pool_name}: {found}")
    # the feature layer: the module before the pooling among its siblings (up the tree if first)
    parent, _, leaf = pool_name.rpartition(".")
    while True:
        pmod = model.get_submodule(parent) if parent else model
        names = [n for n, _ in pmod.named_children()]
        i = names.index(leaf)
        if i > 0:
            layer = f"{parent}.{names[i - 1]}" if parent else names[i - 1]
            break
        if not parent:
            raise ValueError(f"attnkern.explain.cam: no module runs before {pool_name} in {type(model).__name__}")
        parent, _, leaf = parent.rpartition(".")
    return layer, pool_name, linears[0][0]


class CamRecorder:
    """Forward hooks that keep the last feature maps (the pooling's input, by reference: no
    copy) and check, once, that the classifier sees exactly their spatial mean and produces the
    model's output. ``maps(logits, target)`` then computes the class activation maps.

    Use as a context manager (the hooks are removed on exit) around forward passes of
    ``model`` (a ``torch.compile`` wrapper too: dynamo traces the hooks)."""

    def __init__(self, model: nn.Module):
        base = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        self.layer, self.pool_name, self.fc_name = find_gap_linear_head(base)
        self.model_name = type(base).__name__
        self.pool = base.get_submodule(self.pool_name)
        self.fc: nn.Linear = base.get_submodule(self.fc_name)
        self.features: Optional[torch.Tensor] = None
        self.fc_in: Optional[torch.Tensor] = None
        self.fc_out: Optional[torch.Tensor] = None
        self.checked = False
        self._handles: List = []

    def _keep_features(self, module, args):
        self.features = args[0]

    def _keep_fc(self, module, args, out):
        if not self.checked:
            self.fc_in, self.fc_out = args[0], out

    def attach(self) -> "CamRecorder":
        self._handles = [self.pool.register_forward_pre_hook(self._keep_features),
                         self.fc.register_forward_hook(self._keep_fc)]
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features = self.fc_in = self.fc_out = None

    __enter__ = attach

    def __exit__(self, *exc):
        self.close()

    def _check(self, logits: torch.Tensor) -> None:
        a, z = self.features, self.fc_in
        if a is None or z is None:
            raise ValueError(f"attnkern.explain.cam: {self.pool_name} or {self.fc_name} of {self.model_name} did "
                             "not run in the forward pass")
        if a.dim() != 4:
            raise ValueError(f"attnkern.explain.cam: the input of {self.pool_name} must be [B, C, h, w] feature "
                             f"maps, got shape {tuple(a.shape)}")
        pooled = a.float().mean((2, 3))
        z = z.float().reshape(pooled.shape[0], -1)
        tol = 1e-3 if a.dtype in (torch.float32, torch.float64) else 3e-2
        scale = float(pooled.abs().max()) + 1e-6
        if z.shape != pooled.shape or float((z - pooled).abs().max()) > tol * scale:
            raise ValueError(f"attnkern.explain.cam: {self.fc_name} of {self.model_name} does not take the global "
                             f"average of {self.pool_name}'s input (something runs between them); CAM needs global "
                             "average pooling followed directly by one linear layer")
        out = self.fc_out
        if out is not logits and (out is None or out.shape != logits.shape
                                  or float((out.float() - logits.float()).abs().max())
                                  > tol * (float(logits.float().abs().max()) + 1e-6)):
            raise ValueError(f"attnkern.explain.cam: the output of {self.model_name} is not the output of "
                             f"{self.fc_name} (something runs after the classifier); CAM needs the linear "
                             "classifier to be the last layer")
        self.checked = True
        self.fc_in = self.fc_out = None

    def maps(self, logits: torch.Tensor, target: Union[None, int, torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(maps [B, h, w], target [B]) of the last forward: ``target`` None is the predicted class
        (argmax of ``logits``), an int the same class for every image, a [B] tensor one each."""
        if not self.checked:
            self._check(logits)
        a = self.features
        B, classes = a.shape[0], self.fc.out_features
        if target is None:
            target = logits.detach().argmax(dim=1)
        elif isinstance(target, int) and not isinstance(target, bool):
            if not -classes <= target < classes:
                raise IndexError(f"attnkern.explain.cam: target {target} is out of range for {classes} classes")
            target = torch.full((B,), target % classes, dtype=torch.long, device=a.device)
        elif isinstance(target, torch.Tensor) and not target.is_floating_point() and target.shape == (B,):
            target = target.to(a.device, torch.long)
            if bool(((target < 0) | (target >= classes)).any()):
                raise IndexError(f"attnkern.explain.cam: target holds a class outside 0 .. {classes - 1}")
        else:
            raise TypeError("attnkern.explain.cam: target must be None, an int or an integer tensor [B], got "
                            f"{type(target).__name__}" + (f" of shape {tuple(target.shape)}" if isinstance(target, torch.Tensor) else ""))
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        w = self.fc.weight.detach().to(acc)[target]                      # [B, K]
        with torch.autocast(a.device.type, enabled=False):              # fp32 / fp64 even under autocast
            maps = torch.einsum("bk,bkhw->bhw", w, a.detach().to(acc))
        return maps, target


def cam(model: nn.Module, x: torch.Tensor, target: Union[None, int, torch.Tensor] = None) -> CamResult:
    """Class activation maps of ``model`` for the images ``x`` [B, 3, H, W], from one forward pass
    (no backward; under ``torch.no_grad`` here).

    ``target``: None (each image's predicted class), an int, or an integer tensor [B]. Returns a
    :class:`CamResult`: ``maps`` [B, h, w] (h, w: the last feature maps' size, e.g. H/32;
    float32, float64 if the model runs in float64; unnormalised, in logit units: their spatial
    mean plus the classifier's bias is the target's logit), ``target`` [B], ``layer`` (the name
    of the module whose output the maps are made from), ``logits``.

    Raises ``ValueError`` for a model whose head is not global average pooling followed by one
    linear layer (timm: ``SelectAdaptivePool2d('avg')`` / ``ClassifierHead`` + ``Linear``;
    torchvision: ``AdaptiveAvgPool2d(1)`` + ``Linear``), ``IndexError`` for a class out of range.
    Source: Zhou et al., CVPR 2016, eq. (1)-(2)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"attnkern.explain.cam: x must be a 4-D tensor [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    with CamRecorder(model) as rec, torch.no_grad():
        logits = model(x)
        maps, t = rec.maps(logits, target)
        return CamResult(maps, t, rec.layer, logits)
