"""Pure-PyTorch reference of squeeze-and-excitation (Hu et al., 2017).

    s   = mean_hw(x)                       (timm's add_maxpool: 0.5 * mean + 0.5 * max)
    gc  = gate(mlp(s))                     [B, C]
    out = x * gc

``mlp`` maps [B, C] -> [B, C] (timm: 1x1 conv, optional norm, act, 1x1 conv; torchvision the
same without norm; the common Linear variant). Runs in x's dtype, as those modules do.
Depends on nothing but torch.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor


def squeeze_excite(
    x: Tensor,
    mlp: Callable[[Tensor], Tensor],
    *,
    gate: Callable[[Tensor], Tensor] = torch.sigmoid,
    add_maxpool: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Returns ``(out, gc)``: the output and the channel gate [B, C]."""
    s = x.mean(dim=(2, 3))
    if add_maxpool:
        s = 0.5 * s + 0.5 * x.amax(dim=(2, 3))
    gc = gate(mlp(s)).to(x.dtype)
    return x * gc[:, :, None, None], gc
