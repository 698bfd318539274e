"""The one place that states how close a kernel must be to the reference.

Rule (as FlashAttention's tests): compute the reference twice, in float32 and in the input's
dtype. The kernel's error against the float32 reference may be at most ``FACTOR`` times the
error of the same-dtype reference (``GRAD_FACTOR`` for gradients), plus a small floor
``ATOL + RTOL * |ref32|``. float32 and float64 have no lower-precision twin: they compare
directly with the floor alone.
"""
from __future__ import annotations

from typing import Optional

import torch

FACTOR = 2.0
GRAD_FACTOR = 3.0

# Floors per dtype: (atol, rtol).
FLOOR = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-3, 1e-3),
    torch.float16: (1e-4, 1e-3),
}


def assert_close(
    actual: torch.Tensor,
    ref32: torch.Tensor,
    ref_lowp: Optional[torch.Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    grad: bool = False,
    name: str = "output",
) -> None:
    """Check ``actual`` against the float32 reference ``ref32`` under the rule above.

    ``dtype`` is the dtype the computation ran in (defaults to ``actual.dtype``); for float16
    and bfloat16 ``ref_lowp`` (the reference computed in that dtype) is required.
    """
    dtype = dtype or actual.dtype
    if actual.shape != ref32.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref32.shape)}")
    a = actual.detach().double()
    r = ref32.detach().double()
    atol, rtol = FLOOR[dtype]
    budget = atol + rtol * r.abs()
    if dtype in (torch.float16, torch.bfloat16):
        if ref_lowp is None:
            raise ValueError(f"{name}: a {dtype} comparison needs the same-dtype reference")
        ref_err = (ref_lowp.detach().double() - r).abs().max().item() if r.numel() else 0.0
        budget = budget + (GRAD_FACTOR if grad else FACTOR) * ref_err
    nan_a, nan_r = torch.isnan(a), torch.isnan(r)
    if not torch.equal(nan_a, nan_r):
        raise AssertionError(f"{name}: NaN pattern differs from the reference")
    err = (a - r).abs().masked_fill(nan_r, 0.0)
    bad = err > budget
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {bad.numel()} elements out of tolerance; "
            f"first at flat index {i}: got {a.flatten()[i].item():.6g}, "
            f"reference {r.flatten()[i].item():.6g}, allowed error {budget.flatten()[i].item():.3g}, "
            f"max error {err.max().item():.3g}"
        )
