"""The one place that states how close a kernel must be to the reference.

Rule (as FlashAttention's tests): compute the reference twice, in a higher precision and in
the input's dtype. The kernel's error against the high-precision reference may be at most
``FACTOR`` times the error of the same-dtype reference (``GRAD_FACTOR`` for gradients), plus a
small floor ``ATOL + RTOL * |ref|``. The high precision is float32 for float16/bfloat16
inputs and float64 for float32 inputs (whole blocks, whose BatchNorm gradients cancel enough
that a fixed relative floor would flag the reference's own rounding); a comparison given no
same-dtype reference (float64, or float32 primitives computed in float32 by both sides) uses
the floor alone.
"""
from __future__ import annotations

from typing import Optional

import torch

FACTOR = 2.0
GRAD_FACTOR = 3.0

# Floors per dtype: (atol, rtol). For the half types the relative floor is one unit in the
# last place (the output itself is rounded to that dtype).
FLOOR = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-3, torch.finfo(torch.bfloat16).eps),
    torch.float16: (1e-4, torch.finfo(torch.float16).eps),
}


def assert_close(
    actual: torch.Tensor,
    ref32: torch.Tensor,
    ref_lowp: Optional[torch.Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    grad: bool = False,
    name: str = "output",
    scale: float = 0.0,
) -> None:
    """Check ``actual`` against the high-precision reference ``ref32`` under the rule above.

    ``dtype`` is the dtype the computation ran in (defaults to ``actual.dtype``); for float16
    and bfloat16 ``ref_lowp`` (the reference computed in that dtype) is required; for float32
    it is optional (then ``ref32`` should be a float64 reference). ``scale`` (e.g. the largest
    gradient of a module) adds ``RTOL * scale`` to the floor: gradients that are zero up to
    rounding (a bias followed by a training-mode BatchNorm) carry rounding noise of that size.
    """
    dtype = dtype or actual.dtype
    if actual.shape != ref32.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref32.shape)}")
    a = actual.detach().double()
    r = ref32.detach().double()
    atol, rtol = FLOOR[dtype]
    budget = atol + rtol * (r.abs() + scale)
    if dtype in (torch.float16, torch.bfloat16) and ref_lowp is None:
        raise ValueError(f"{name}: a {dtype} comparison needs the same-dtype reference")
    if ref_lowp is not None:
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


def worse(ref32: torch.Tensor, *candidates: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Of several same-dtype references, the one farthest from ``ref32``: a kernel may be as far
    off as the least accurate of the legitimate ways to compute in that dtype."""
    best, err = None, -1.0
    for c in candidates:
        if c is None:
            continue
        e = (c.detach().double() - ref32.detach().double()).abs().max().item() if c.numel() else 0.0
        if e > err:
            best, err = c, e
    return best


def flash_grads_from_rounded_output(q, k, v, out_lowp, dout, mask=None, is_causal=False, scale=None):
    """The same-dtype reference of attention gradients for kernels that, like FlashAttention,
    compute the softmax backward's row term ``delta = rowsum(out * dout)`` from the output as
    stored in its dtype: everything in float32 except that rounding. Returns (dq, dk, dv) in
    q's dtype. (In float16/bfloat16 that rounding is the dominant error of such a backward
    when ``dP - delta`` cancels.)"""
    import math

    from attnkern.reference.attention import attention_probs

    f = torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, _ = attention_probs(q.to(f), k.to(f), mask if mask is None or mask.dtype == torch.bool else mask.to(f),
                           is_causal, scale)
    do = dout.to(f)
    dp = do @ v.to(f).transpose(-1, -2)
    delta = (out_lowp.to(f) * do).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ k.to(f)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(f)) * scale
    dv = p.transpose(-1, -2) @ do
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
