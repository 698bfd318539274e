"""Small helpers the drop-in modules share: timm's channel rounding, activation and gate lookup,
and the checks a converter makes before it takes over another library's layers."""
from __future__ import annotations

import copy
from typing import Callable, Optional, Type, Union

import torch
from torch import Tensor, nn

LayerSpec = Union[str, Type[nn.Module], nn.Module, Callable, None]

_ACTS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "mish": nn.Mish, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid, "hardsigmoid": nn.Hardsigmoid,
    "hard_swish": nn.Hardswish, "hardswish": nn.Hardswish, "identity": nn.Identity,
}


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None, round_limit: float = 0.9) -> int:
    """Round ``v`` to a multiple of ``divisor`` the way timm does (``timm.layers.make_divisible``):
    to the nearest multiple, at least ``min_value`` (default ``divisor``), bumped up one
    multiple if rounding lost more than ``1 - round_limit`` of ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def create_layer(spec: LayerSpec, what: str, inplace: Optional[bool] = None) -> nn.Module:
    """An activation or gate module from a name (``'relu'``, ``'sigmoid'``, ``'hard_sigmoid'``,
    ...), an ``nn.Module`` class, an instance, or a plain function of one tensor."""
    if spec is None:
        return nn.Identity()
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        key = spec.lower()
        if key not in _ACTS:
            raise ValueError(f"unknown {what} {spec!r}; known: {', '.join(sorted(_ACTS))}")
        spec = _ACTS[key]
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        if inplace is not None:
            try:
                return spec(inplace=inplace)
            except TypeError:
                pass
        return spec()
    if callable(spec):
        return _FnLayer(spec)
    raise TypeError(f"{what} must be a name, an nn.Module class or instance, or a function; got {spec!r}")


class _FnLayer(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def check_module_input(name: str, x, channels: int, param: torch.Tensor) -> None:
    """Channel count and device of a module's input against its parameters."""
    from ..functional import check_feature_map

    check_feature_map(name, x)
    if x.shape[1] != channels:
        raise ValueError(
            f"attnkern.{name}: x has {x.shape[1]} channels but the module was built for "
            f"{channels} (x shape {tuple(x.shape)})"
        )
    if x.device != param.device:
        raise ValueError(
            f"attnkern.{name}: x is on {x.device} but the module's parameters are on {param.device}"
        )


class NotConvertible(ValueError):
    """Raised by a ``from_*`` converter for a module whose configuration the fused module cannot
    reproduce exactly; :func:`attnkern.convert` then leaves that module as it is (with a
    warning that gives this message)."""


def reuse(layer: nn.Module) -> nn.Module:
    """A converter's copy of one of the replaced module's small layers (activation, gate, norm):
    the object itself, deep-copied, so every constructor argument (a LeakyReLU's slope, a norm's
    eps, ...) and any parameter it holds is kept; never rebuilt from its type."""
    return copy.deepcopy(layer)


def _is_matrix_product_conv(layer: nn.Module) -> bool:
    """An ``nn.Conv2d`` with its class's forward whose every output pixel is ``W @`` the input
    pixel (+ bias): 1x1, stride 1, no padding, no dilation, one group."""
    return (isinstance(layer, nn.Conv2d) and type(layer).forward is nn.Conv2d.forward
            and layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid")
            and layer.dilation == (1, 1) and layer.groups == 1)


def require_pointwise(what: str, layer: nn.Module) -> None:
    """A 1x1 convolution (or Linear) that acts as a plain matrix product on a pooled vector:
    the fused modules apply it as ``F.linear(v, weight.flatten(1), bias)``."""
    if isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
        return
    if _is_matrix_product_conv(layer):
        return
    if isinstance(layer, nn.Conv2d) and type(layer).forward is nn.Conv2d.forward:
        k, s, p, d = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        raise NotConvertible(
            f"{what} is a Conv2d(kernel_size={k}, stride={s}, padding={p}, dilation={d}, "
            f"groups={layer.groups}); only a plain 1x1 convolution (a matrix product) can be fused")
    raise NotConvertible(f"{what} is a {type(layer).__name__}; only nn.Conv2d 1x1 or nn.Linear can be fused")


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run any forward or backward hook (its own or global)."""
    from torch.nn.modules import module as _module

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def plain_pointwise_conv(conv: nn.Module, x: Tensor) -> bool:
    """Whether ``conv`` is a plain 1x1 ``nn.Conv2d`` (stride 1, no padding, one group, no hooks,
    the forward of ``nn.Conv2d``) that may be computed as a matrix product on x in its place: a CPU
    tensor of the weight's dtype, outside autocast and ``torch.compile`` (which plans its own
    layouts)."""
    return (_is_matrix_product_conv(conv) and not has_hooks(conv) and "forward" not in conv.__dict__
            and x.device.type == "cpu" and x.dtype == conv.weight.dtype
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


def pointwise_conv(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(x)`` for a 1x1 ``nn.Conv2d``, x [B, C, H, W].

    On an NCHW CPU tensor in eager mode (:func:`plain_pointwise_conv`) it is computed as one
    batched matrix product, ``bias + W [R, C] @ x[b] viewed [C, H*W]``
    (:func:`attnkern.ops.gating.pointwise_projection`): the same sums in another order, with
    the same autograd (the gradients of x, the weight and the bias). oneDNN's NCHW convolution
    takes x, and in the backward pass its gradient, through blocked layouts in temporary
    x-sized buffers; with R = C/16 (BAM's spatial branch: 256 -> 16 at 8x256x56x56, 512 -> 32 at
    16x512x28x28) the product measured 2.4-3.0x faster forward and 1.2-3.6x forward+backward
    (2 cores of an Intel Xeon, float32).
    Anywhere else (channels_last, where oneDNN's convolution is already direct; CUDA; under
    ``torch.compile``; a conv with hooks or another configuration) it is ``conv(x)``.
    """
    if x.dim() != 4 or not x.is_contiguous() or not plain_pointwise_conv(conv, x):
        return conv(x)
    from ..ops.gating import pointwise_projection

    return pointwise_projection(x, conv.weight, conv.bias)


def residual_epilogue_primitives(module: nn.Module, name: str, op: str, x: Tensor, residual: Tensor,
                                 channels: int, param: Tensor):
    """The first half of a gating block's ``_residual_forward``: ``(primitives, in_place)`` for
    ``relu?(module(x) + residual)`` with the add and the activation in the apply pass (written
    into x without autograd, a new tensor with it), or None where that does not apply
    (:func:`residual_epilogue_ok`, or the reference backend). ``name``/``op``: the module's
    and the fused op's names; ``channels``/``param`` as :func:`check_module_input` takes them."""
    from ..ops.gating import pick_backend, primitives_for

    in_place = not torch.is_grad_enabled()
    if not residual_epilogue_ok(module, x, residual, in_place):
        return None
    check_module_input(name, x, channels, param)
    backend = pick_backend(op, x)
    if backend == "reference":
        return None
    return primitives_for(backend, x), in_place


def residual_epilogue_ok(module: nn.Module, x: Tensor, residual: Tensor, in_place: bool = True) -> bool:
    """Whether a block may fuse its residual add and activation into ``module``'s apply pass:
    eager (not traced by ``torch.compile``), no hooks that expect ``module`` to be called, x
    dense (NCHW or channels_last) and residual of x's shape, dtype, device and layout. Writing
    into ``x`` (``in_place``) also needs inference without autograd and residual in a different
    storage."""
    if torch.compiler.is_compiling() or has_hooks(module):
        return False
    if in_place and torch.is_grad_enabled():
        return False
    if not isinstance(x, Tensor) or not isinstance(residual, Tensor) or x.dim() != 4:
        return False
    fmt = torch.channels_last if (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)) \
        else torch.contiguous_format
    return (x.is_contiguous(memory_format=fmt) and residual.is_contiguous(memory_format=fmt)
            and residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device
            and (not in_place or residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()))
