"""timm's ResNet and its blocks as ``attnkern.convert`` patches them: each BatchNorm in eval
mode folded into the convolution before it, and on CPU the features computed channels_last.

In eval mode a BatchNorm is an affine map per channel, ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``, so ``bn(conv(x))`` is one convolution with weight ``w * s``
(per output channel) and bias ``beta + (b - mean) * s`` (Ioffe & Szegedy, 2015; the standard
conv-BN fusion for inference, as in ``torch.nn.utils.fusion.fuse_conv_bn_eval``). In eager
PyTorch every BatchNorm is a pass of its own over a freshly allocated activation; folded, it
costs nothing (the folded weights are computed once and kept until a parameter or running
statistic changes). A patched block:

- in eval mode runs each (Conv2d, BatchNorm2d) pair, the downsampling shortcut's included, as
  one folded convolution, then the attention block, the residual add and the activation as
  timm does; gradients (Grad-CAM, input attributions) flow to the same parameters;
- in eval mode without autograd, when the attention block is attnkern's CBAM or SqueezeExcite
  (the kernels' backend, no hooks on it), writes ``relu(attn(x) + shortcut)`` into x in the
  attention's apply pass (``attnkern::gate_apply_residual_``): no pass of its own for the add
  or the activation, and no new tensor for the block's output; on CPU (in the dtypes of
  :func:`_onednn_dtype`, and under CPU autocast in its dtype, see :func:`_onednn_conv_dtype`)
  every folded convolution runs as oneDNN's inference op with its weight packed once into
  oneDNN's layout (:func:`_packed_weights`; the packed copies hold as many bytes as the model's
  convolution weights), and the ReLUs after the first convolutions are its post-ops
  (:func:`conv_bn_act`), no pass of their own either;
- with autograd (training mode, or eval mode under a gradient), when the attention block is
  attnkern's CBAM or SqueezeExcite, computes ``relu(attn(x) + shortcut)`` as a new tensor in the
  attention's apply pass (``attnkern::gate_apply_residual``), and in backward masks the gradient
  by the ReLU once for both branches: no pass of its own for the add or the activation forward
  (timm's tail reads and writes the block's output three more times). The same code runs in
  both modes: a BatchNorm in training mode (batch statistics) is not folded and runs as timm
  runs it, one in eval mode (frozen while the model trains, say) is folded;
- while ``torch.compile`` traces it (the compiler fuses BatchNorm, the add and the ReLU on its
  own), runs timm's forward unchanged.

timm's ``ResNet`` itself is patched too. On CPU, eager, in float32, and in bfloat16 or float16
where the CPU has oneDNN's native kernels for them (eval and training mode; a float32 model
under CPU autocast is float32 here), its ``forward_features`` runs the stem and the four stages
channels_last whatever the input's layout, and returns the features in the input's layout.
oneDNN's convolutions and attnkern's passes are faster on channels_last activations on these
CPUs: an NCHW model otherwise pays, in every convolution, oneDNN's reorders of NCHW activations
into its blocked layouts and back, in freshly allocated temporaries. ``torch.compile`` makes
the same choice for a graph of convolutions (inductor's layout optimization), which is why it
led eager NCHW by 1.3x on a whole CBAM-ResNet-50. Values are those of the NCHW model up to the
rounding of the convolutions' algorithms; forward hooks on the inner layers see channels_last
tensors. In eval mode the stem's BatchNorm is folded into its convolution as in the blocks.
Under ``torch.compile``, export, gradient checkpointing, other devices and dtypes (float64; a
bfloat16 or float16 model on a CPU without oneDNN's kernels for it) it runs timm's
``forward_features``. The reduced dtypes matter most: a bfloat16 CBAM-ResNet-50 fed NCHW ran at
0.40x ``torch.compile`` while it kept NCHW on an AVX512_BF16 CPU, as channels_last 1.34x.

Patching swaps the class for a subclass with these methods (:func:`patch_block`): the
submodules, parameters and ``state_dict`` keys stay the same, and an unpatched model loads the
checkpoint of a patched one and vice versa. Blocks whose convolutions or norms are not plain
``nn.Conv2d`` / ``nn.BatchNorm2d`` are left alone.
"""
from __future__ import annotations

import functools
import weakref
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._backend import exporting
from ..ops.gating import memory_format_of
from ._layers import has_hooks

__all__ = ["conv_bn", "conv_bn_act", "patch_block", "runs_channels_last", "PATCHABLE", "FOLDED_BLOCKS",
           "CHANNELS_LAST_MODELS"]

#: timm classes ``convert`` patches, by fully qualified name: the two residual blocks and the model.
PATCHABLE = ("timm.models.resnet.BasicBlock", "timm.models.resnet.Bottleneck", "timm.models.resnet.ResNet")
#: The (conv, norm) attribute pairs of each.
_PAIRS = {
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}
FOLDED_BLOCKS: Dict[type, type] = {}  # timm block class -> its patched subclass
CHANNELS_LAST_MODELS: Dict[type, type] = {}  # timm ResNet -> its patched subclass


def _plain_conv(m) -> bool:
    return type(m) is nn.Conv2d


def _plain_bn(m) -> bool:
    return type(m) is nn.BatchNorm2d and m.track_running_stats


def _versions(*ts: Optional[Tensor]) -> Tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in ts)


def folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """``(weight, bias)`` of the convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode,
    computed in float32 (float64 for float64 parameters) and cast to the conv weight's dtype.
    Cached on ``conv`` while no tensor it depends on changes and no gradient is asked for."""
    srcs = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in srcs)
    key = _versions(*srcs) + (bn.eps,)
    cache = conv.__dict__.get("_attnkern_folded")
    if not track and cache is not None and cache[0] == key:
        return cache[1]
    w = conv.weight
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc)
    if conv.bias is not None:
        shift = shift + conv.bias.to(acc)
    bias = shift * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(acc)
    weight = (w.to(acc) * scale.view(-1, 1, 1, 1)).to(w.dtype)
    if weight.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)
    out = (weight, bias.to(w.dtype))
    if not track:
        conv.__dict__["_attnkern_folded"] = (key, out)
    return out


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(conv(x))`` may run as one folded convolution: a plain Conv2d and a
    BatchNorm2d in eval mode, neither with hooks (which expect it called)."""
    return not bn.training and _plain_conv(conv) and _plain_bn(bn) and not has_hooks(conv) and not has_hooks(bn)


def conv_bn(conv: nn.Module, bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(conv(x))``; one folded convolution where :func:`_foldable`, with oneDNN's packed
    weight where :func:`_onednn_conv_dtype` gives a dtype."""
    if not _foldable(conv, bn):
        return bn(conv(x))
    weight, bias = folded_weights(conv, bn)
    dtype = _onednn_conv_dtype(conv, x)
    if dtype is not None:
        return _onednn_conv(conv, weight, bias, x, "none", dtype)
    return conv._conv_forward(x, weight, bias)


@functools.lru_cache(maxsize=None)
def _onednn_reduced_supported(dtype: torch.dtype) -> bool:
    """Whether this CPU has oneDNN's native kernels for ``dtype`` (bfloat16: AVX512_BF16,
    AVX-512 or AMX; float16: AVX512_FP16 or AMX-FP16), the check inductor makes before it
    gives oneDNN a reduced-precision convolution. Without them oneDNN falls back to slower
    paths whose layout preference was not measured. Asked once per dtype: the CPU does not
    change."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def _onednn_dtype(x: Tensor) -> bool:
    """x a 4-D CPU tensor that oneDNN convolves natively: float32, or bfloat16 / float16 where
    the CPU has oneDNN's kernels for it (:func:`_onednn_reduced_supported`); oneDNN available and
    enabled. Where the layout and post-op choices below were measured."""
    return (isinstance(x, Tensor) and x.dim() == 4 and x.device.type == "cpu"
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and (x.dtype == torch.float32 or _onednn_reduced_supported(x.dtype)))


def _onednn_conv_dtype(conv: nn.Conv2d, x: Tensor) -> Optional[torch.dtype]:
    """The dtype in which a folded ``conv(x)`` may run as oneDNN's inference convolution
    (``mkldnn::_convolution_pointwise``, the op inductor calls) with a packed weight, or None:
    no autograd (the op has no derivative), not while ``torch.jit.trace`` or an exporter
    records (an opaque oneDNN weight is no constant a saved graph can hold), the convolution
    zero-padded with explicit padding, and x a 4-D CPU tensor of a dtype oneDNN convolves
    natively (:func:`_onednn_dtype`) and the convolution's weight dtype, or, under CPU
    autocast to bfloat16 / float16 with oneDNN's kernels for it, float32 weights: then the
    autocast dtype, as autocast would run the convolution (the op is not autocast's, so the
    cast is done here)."""
    if (torch.is_grad_enabled() or exporting() or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
            or not _onednn_dtype(x)):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        ok = (conv.weight.dtype == torch.float32 and x.dtype in (torch.float32, dtype)
              and _onednn_reduced_supported(dtype))
        return dtype if ok else None
    return x.dtype if conv.weight.dtype == x.dtype else None


def _relu_post_op_dtype(conv: nn.Conv2d, act: nn.Module, x: Tensor) -> Optional[torch.dtype]:
    """The dtype in which ``act(conv(x))`` may run as one oneDNN convolution with the ReLU as
    its post-op, or None: ``act`` a plain ``nn.ReLU`` without hooks, and
    :func:`_onednn_conv_dtype`."""
    return _onednn_conv_dtype(conv, x) if type(act) is nn.ReLU and not has_hooks(act) else None


# conv -> (its folded weights' cache key, input shape and dtype, oneDNN's packed copy of the
# folded weight, the folded bias in that dtype). Kept beside the module, not in it: a deep copy or a pickle of the model never holds
# an opaque oneDNN tensor, and the entry goes with the module.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, Tuple]" = weakref.WeakKeyDictionary()


def _packed_weights(conv: nn.Conv2d, weight: Tensor, bias: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """The folded ``weight`` reordered once into the blocked layout oneDNN's convolution picks
    for inputs of x's shape (``mkldnn::_reorder_convolution_weight``, inductor's weight
    prepacking under ``freezing``), so the convolution stops reordering it on every call: most
    of the saving is in the deep layers, whose weights are large against their maps (bfloat16
    3x3 512-channel convolution at 8x8: 1.32x). Kept while the folded weights are (same
    parameters and statistics) and the input's shape and dtype stay, with the folded ``bias``
    in x's dtype; otherwise both in x's dtype, unpacked."""
    cache = conv.__dict__.get("_attnkern_folded")
    if cache is None or cache[1][0] is not weight:  # not a cached folded weight: nothing to key on
        return weight.to(x.dtype), bias.to(x.dtype)
    key = (tuple(x.shape), x.dtype)
    entry = _PACKED.get(conv)
    if entry is None or entry[0] != cache[0] or entry[1] != key:
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight.to(x.dtype), list(conv.padding),
                                                               list(conv.stride), list(conv.dilation), conv.groups,
                                                               list(x.shape))
        entry = _PACKED[conv] = (cache[0], key, packed, bias.to(x.dtype))
    return entry[2], entry[3]


def _onednn_conv(conv: nn.Conv2d, weight: Tensor, bias: Tensor, x: Tensor, attr: str,
                 dtype: torch.dtype) -> Tensor:
    """The folded convolution as oneDNN's inference op with its packed weight, in ``dtype``
    (from :func:`_onednn_conv_dtype`; x, weight and bias cast to it under autocast); ``attr``:
    "relu" (the ReLU as a post-op) or "none"."""
    x = x.to(dtype)
    weight, bias = _packed_weights(conv, weight, bias, x)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.padding), list(conv.stride),
                                                   list(conv.dilation), conv.groups, attr, [], "")


def conv_bn_act(conv: nn.Module, bn: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    """``act(bn(conv(x)))``: :func:`conv_bn`, and when the pair is folded, ``act`` is a ReLU and
    no gradient is recorded, one oneDNN convolution that applies the ReLU as it writes its
    output (``mkldnn::_convolution_pointwise``, as inductor calls it): no pass of its own."""
    if not _foldable(conv, bn):
        return act(bn(conv(x)))
    weight, bias = folded_weights(conv, bn)
    dtype = _relu_post_op_dtype(conv, act, x)
    if dtype is not None:
        return _onednn_conv(conv, weight, bias, x, "relu", dtype)
    return act(conv_bn(conv, bn, x))


def _conv_bn_drop_act(conv: nn.Module, bn: nn.Module, drop_block: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    """``act(drop_block(bn(conv(x))))``, timm's order; :func:`conv_bn_act` when there is no
    DropBlock (an ``nn.Identity``)."""
    if type(drop_block) is nn.Identity:
        return conv_bn_act(conv, bn, act, x)
    return act(drop_block(conv_bn(conv, bn, x)))


def _shortcut(downsample: Optional[nn.Module], x: Tensor) -> Tensor:
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
        return conv_bn(downsample[0], downsample[1], x)
    return downsample(x)


def _gate_residual_relu(attn: Optional[nn.Module], drop_path: Optional[nn.Module], act: nn.Module,
                        x: Tensor, shortcut: Tensor) -> Optional[Tensor]:
    """``act(attn(x) + shortcut)`` with the add and the activation in the apply pass when
    ``attn`` is an attnkern gating block that takes them (:meth:`attnkern.CBAM._residual_forward`:
    without autograd written into x, the block's own intermediate; with autograd a new
    tensor); None otherwise."""
    if attn is None or drop_path is not None or type(act) not in (nn.ReLU, nn.Identity) or has_hooks(act):
        return None
    fuse = getattr(attn, "_residual_forward", None)
    if fuse is None:
        return None
    return fuse(x, shortcut, relu=type(act) is nn.ReLU)


def _attention_residual_act(block: nn.Module, x: Tensor, shortcut: Tensor, act: nn.Module) -> Tensor:
    """The tail both timm blocks share: ``act(drop_path(se(x)) + shortcut)``, fused into the
    attention's apply pass where it can be (:func:`_gate_residual_relu`)."""
    fused = _gate_residual_relu(block.se, block.drop_path, act, x, shortcut)
    if fused is not None:
        return fused
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    x += shortcut
    return act(x)


def _basic_forward(self, x: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return type(self).__mro__[1].forward(self, x)
    shortcut = x
    x = _conv_bn_drop_act(self.conv1, self.bn1, self.drop_block, self.act1, x)
    x = self.aa(x)
    x = conv_bn(self.conv2, self.bn2, x)
    return _attention_residual_act(self, x, _shortcut(self.downsample, shortcut), self.act2)


def _bottleneck_forward(self, x: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return type(self).__mro__[1].forward(self, x)
    shortcut = x
    x = conv_bn_act(self.conv1, self.bn1, self.act1, x)
    x = _conv_bn_drop_act(self.conv2, self.bn2, self.drop_block, self.act2, x)
    x = self.aa(x)
    x = conv_bn(self.conv3, self.bn3, x)
    return _attention_residual_act(self, x, _shortcut(self.downsample, shortcut), self.act3)


def runs_channels_last(x: Tensor) -> bool:
    """Whether a patched ResNet runs its features channels_last for input ``x``: eager (not
    ``torch.compile``, which chooses layouts itself, nor export or ``torch.jit.trace``), x a 4-D
    CPU tensor that oneDNN convolves natively (:func:`_onednn_dtype`)."""
    return not torch.compiler.is_compiling() and not exporting() and _onednn_dtype(x)


def _resnet_forward_features(self, x: Tensor) -> Tensor:
    if getattr(self, "grad_checkpointing", False) or torch.compiler.is_compiling() or exporting():
        return type(self).__mro__[1].forward_features(self, x)
    fmt = None
    if _onednn_dtype(x):  # runs_channels_last: eager was checked above
        fmt = memory_format_of(x)  # the layout timm's convolutions would have given the features
        x = x.contiguous(memory_format=torch.channels_last)
    x = conv_bn_act(self.conv1, self.bn1, self.act1, x)
    x = self.maxpool(x)
    x = self.layer1(x)
    x = self.layer2(x)
    x = self.layer3(x)
    x = self.layer4(x)
    return x if fmt is None else x.contiguous(memory_format=fmt)


# class name -> (prefix of the patched class's name, registry, methods, what the patch does)
_PATCHES = {
    "BasicBlock": ("Folded", FOLDED_BLOCKS, {"forward": _basic_forward},
                   "eval-mode BatchNorms folded into their convolutions"),
    "Bottleneck": ("Folded", FOLDED_BLOCKS, {"forward": _bottleneck_forward},
                   "eval-mode BatchNorms folded into their convolutions"),
    "ResNet": ("ChannelsLast", CHANNELS_LAST_MODELS, {"forward_features": _resnet_forward_features},
               "features computed channels_last on CPU, the stem's BatchNorm folded in eval mode"),
}


def _patched_class(cls: type) -> type:
    prefix, registry, methods, what = _PATCHES[cls.__name__]
    if cls not in registry:
        name = f"{prefix}{cls.__name__}"
        registry[cls] = type(name, (cls,), {
            **methods,
            "__doc__": f"timm's {cls.__name__}, patched by attnkern.convert: {what} (attnkern.nn.resnet).",
            "__module__": __name__,
            "__qualname__": name,
        })
        globals()[name] = registry[cls]  # so a pickled model finds the class
    return registry[cls]


def patchable(m: nn.Module) -> bool:
    """Whether ``m`` is a timm ResNet block of a class and structure :func:`patch_block` takes."""
    t = type(m)
    if f"{t.__module__}.{t.__qualname__}" not in PATCHABLE:
        return False
    if t.__name__ == "ResNet":
        return True
    return all(_plain_conv(getattr(m, c, None)) and _plain_bn(getattr(m, n, None)) for c, n in _PAIRS[t.__name__])


def patch_block(m: nn.Module) -> nn.Module:
    """Patch ``m`` (a timm ``BasicBlock``, ``Bottleneck`` or ``ResNet``, see :func:`patchable`) in
    place and return it; anything else is returned untouched. Its ``state_dict`` does not change."""
    if patchable(m):
        m.__class__ = _patched_class(type(m))
    return m


def unpatched_class(m: nn.Module) -> Type[nn.Module]:
    """The timm class of a patched block or model (its own class otherwise)."""
    t = type(m)
    return t.__mro__[1] if t in FOLDED_BLOCKS.values() or t in CHANNELS_LAST_MODELS.values() else t
