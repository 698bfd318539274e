"""The case matrix every backend of the gating ops is tested on, stated once."""
from __future__ import annotations

import torch

# (B, C, H, W): batch 1 and >1, channels that are not multiples of 16, 1x1 / non-square / 56x56.
SHAPES = [
    (1, 24, 1, 1),
    (2, 72, 7, 9),
    (1, 24, 56, 56),
    (3, 5, 9, 7),
]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def case_id(shape, layout, dtype) -> str:
    return f"{'x'.join(map(str, shape))}-{layout}-{str(dtype).replace('torch.', '')}"


def make_input(shape, layout: str, dtype: torch.dtype, seed: int = 0, device="cpu") -> torch.Tensor:
    """A random input of ``shape`` in the given layout:
    ``contiguous`` (NCHW), ``channels_last`` (NHWC in memory), or ``sliced`` (a non-contiguous
    view cut from a larger tensor: channels and width both offset)."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    if layout == "sliced":
        big = torch.randn(B, C + 3, H, W + 2, generator=g).to(device=device, dtype=dtype)
        x = big[:, 2:C + 2, :, 1:W + 1]
        assert x.shape == shape
        return x
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout != "contiguous":
        raise ValueError(layout)
    return x


def all_cases():
    """(shape, layout, dtype) triples with readable ids, for pytest.mark.parametrize."""
    import pytest

    return [
        pytest.param(s, l, d, id=case_id(s, l, d))
        for s in SHAPES for l in LAYOUTS for d in DTYPES
    ]
