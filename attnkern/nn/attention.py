"""``attnkern.Attention``: a drop-in for timm's ViT ``Attention`` (multi-head self-attention
with a packed qkv projection) that runs :func:`attnkern.scaled_dot_product_attention`.

Same constructor arguments (names, order, defaults: ``dim, num_heads, attn_head_dim, dim_out,
qkv_bias, qk_norm, scale_norm, proj_bias, gated, attn_drop, proj_drop, norm_layer, device,
dtype``), submodules and ``state_dict`` keys as ``timm.models.vision_transformer.Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``norm``,
``gate``, ``proj``, ``attn_drop``, ``proj_drop``), so a ViT checkpoint loads unchanged and
``attnkern.convert`` swaps timm's layers in place. q, k and v are views of the qkv projection
(no copy); with ``keep_qk = True`` the module keeps the last forward's q and k (detached) for
:func:`attnkern.explain.attention_rows` / :func:`attnkern.explain.attention_received`, which
give the attention maps in O(N) memory.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .. import functional as F_ak
from ._layers import NotConvertible

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head self-attention, timm ViT ``Attention``-compatible.

    Args:
        dim: token width. num_heads: heads. attn_head_dim: per-head width (default dim // num_heads).
        dim_out: output width (default dim). qkv_bias, proj_bias: biases of the projections.
        qk_norm: normalise q and k per head with ``norm_layer`` (as timm). scale_norm: normalise
        the attention output before the projection. gated: a sigmoid gate on the attention output
        from a linear map of the input (timm's ``gated``). attn_drop: dropout on the attention
        probabilities (handed to ATen's SDPA when active). proj_drop: dropout after the projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"attnkern.Attention: dim ({dim}) must be divisible by num_heads ({num_heads}) "
                                 "unless attn_head_dim is given")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("attnkern.Attention: norm_layer must be given when qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.keep_qk = False
        self.last_qk: Optional[Tuple[Tensor, Tensor]] = None

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"attnkern.Attention: x must be [B, N, C], got shape {tuple(x.shape)}")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.keep_qk:
            self.last_qk = (q.detach(), k.detach())
        x = F_ak.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"

    #: The submodules of timm's ViT ``Attention`` that the converted module takes over as they are.
    TIMM_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")

    @classmethod
    def from_timm(cls, m: nn.Module) -> "Attention":
        """An attnkern Attention that computes exactly what ``m`` (timm ViT ``Attention``) does.

        The layer objects of ``m`` themselves move over (``qkv``, ``q_norm``, ``k_norm``,
        ``norm``, ``gate``, ``proj`` and the dropouts: same classes, constructor arguments,
        weights, hooks and ``state_dict`` keys), so any norm layer or configuration timm takes
        is kept. The scale is the one ``m`` uses: 1/sqrt(head_dim) on timm's fused path (which
        ignores ``m.scale``), ``m.scale`` on its explicit path.

        Raises:
            NotConvertible (a ValueError): when the result could not be exact - ``m`` holds submodules besides
                those above, has forward hooks or an instance-level ``forward``, or lacks
                ``num_heads`` / ``head_dim`` / ``qkv`` / ``proj``. ``m`` is left untouched.
        """
        why = cls._why_not_exact(m)
        if why is not None:
            raise NotConvertible(f"attnkern.Attention.from_timm: cannot convert {type(m).__name__} exactly: {why}; "
                             "the module is left unconverted")
        head_dim, num_heads = int(m.head_dim), int(m.num_heads)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = num_heads, head_dim
        new.attn_dim = int(getattr(m, "attn_dim", num_heads * head_dim))
        new.scale = head_dim ** -0.5 if getattr(m, "fused_attn", True) else float(m.scale)
        # The submodules themselves move over: same objects, weights, hooks and keys.
        for name in cls.TIMM_CHILDREN:
            if name == "gate":
                new.gate = getattr(m, "gate", None)
            else:
                setattr(new, name, getattr(m, name) if hasattr(m, name) else nn.Identity())
        new.keep_qk = False
        new.last_qk = None
        new.train(m.training)
        return new

    @classmethod
    def _why_not_exact(cls, m: nn.Module) -> Optional[str]:
        for attr in ("num_heads", "head_dim", "qkv", "proj"):
            if not hasattr(m, attr):
                return f"it has no {attr!r}"
        extra = [n for n, _ in m.named_children() if n not in cls.TIMM_CHILDREN]
        if extra:
            return f"it holds submodules this converter does not know: {extra}"
        if m._forward_hooks or m._forward_pre_hooks:
            return "it has forward hooks, which would not run on the converted module"
        if "forward" in vars(m):
            return "its forward is overridden on the instance"
        if int(getattr(m, "attn_dim", m.num_heads * m.head_dim)) != m.num_heads * m.head_dim:
            return f"attn_dim {m.attn_dim} != num_heads * head_dim"
        return None
