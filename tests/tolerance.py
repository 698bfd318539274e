"""The one place that states how close a kernel must be to the reference.

Rule (as FlashAttention's tests): compute the reference twice, in a higher precision and in
the input's dtype. The kernel's error against the high-precision reference may be at most
``FACTOR`` times the error of the same-dtype reference (``GRAD_FACTOR`` for gradients), plus a
small floor ``ATOL + RTOL * |ref|``. The high precision is float32 for float16/bfloat16
inputs and float64 for float32 inputs (whole blocks, whose BatchNorm gradients cancel enough
that a fixed relative floor would flag the reference's own rounding); a comparison given no
same-dtype reference (float64, or float32 primitives computed in float32 by both sides) uses
the floor alone.

A parameter's gradient is a sum of terms over positions (a BatchNorm bias: of the gradient
reaching each output). When the sum cancels, its value is much smaller than its terms, and the
low-precision noise of the terms decides its error: one same-dtype run then says little (its
sum may cancel its errors by luck on one CPU and not on another). For such gradients the budget
also holds ``GRAD_FACTOR`` times the sum of the same-dtype reference's term errors
(:class:`GradTerms`, :func:`term_error_bounds`), the bound the triangle inequality gives for any
way of rounding those terms: valid whatever kernels a CPU's libraries pick.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

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
    terms: Optional[torch.Tensor] = None,
) -> None:
    """Check ``actual`` against the high-precision reference ``ref32`` under the rule above.

    ``dtype`` is the dtype the computation ran in (defaults to ``actual.dtype``); for float16
    and bfloat16 ``ref_lowp`` (the reference computed in that dtype) is required; for float32
    it is optional (then ``ref32`` should be a float64 reference). ``scale`` (e.g. the largest
    gradient of a module) adds ``RTOL * scale`` to the floor: gradients that are zero up to
    rounding (a bias followed by a training-mode BatchNorm) carry rounding noise of that size.
    ``terms`` (same shape as ``actual``; from :func:`term_error_bounds`) adds ``GRAD_FACTOR``
    times the same-dtype reference's summed term errors, for gradients that are sums which cancel.
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
    if terms is not None:
        budget = budget + GRAD_FACTOR * terms.detach().double()
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


# ------------------------------------------------------------------------------------------
# The peer suites' rules (tests/conformance/): PyTorch's fused-vs-math rule and FlashAttention's
# ------------------------------------------------------------------------------------------

#: PyTorch test/test_transformers.py: the floors of its fused-vs-math tolerances per dtype.
TORCH_SDPA_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float32: 1e-5}
TORCH_SDPA_RTOL = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float32: 1.3e-6}


def torch_sdpa_tolerances(ref_hi: torch.Tensor, ref_lowp: torch.Tensor, fudge: float = 1.0,
                          dtype: Optional[torch.dtype] = None):
    """``(atol, rtol)`` of PyTorch's fused-vs-math rule: the same-dtype MATH result's largest
    absolute and relative deviation from the float64 MATH result, each at least the floor of
    the dtype the attention ran in (``dtype``, default ``ref_lowp``'s: a float32 mask's
    gradient of a bfloat16 attention has bfloat16's floor), times a fudge factor (per output:
    out, dq, dk, dv, dmask). A relative deviation that is NaN (0 / 0) counts as the floor; one
    above 1e30 (x / 0) falls back to the floor."""
    dtype = dtype or ref_lowp.dtype
    hi = ref_hi.detach().double()
    dev = (hi - ref_lowp.detach().double()).abs()
    atol = dev.max().item() if dev.numel() else 0.0
    rel = torch.nan_to_num(dev / hi.abs(), nan=TORCH_SDPA_RTOL[dtype])
    rtol = rel.max().item() if rel.numel() else 0.0
    atol = fudge * max(atol, TORCH_SDPA_ATOL[dtype])
    rtol = fudge * max(rtol, TORCH_SDPA_RTOL[dtype])
    if rtol > 1e30:
        rtol = TORCH_SDPA_RTOL[dtype]
    return atol, rtol


def assert_close_torch_sdpa(actual: torch.Tensor, ref_hi: torch.Tensor, ref_lowp: torch.Tensor,
                            fudge: float = 1.0, name: str = "output",
                            dtype: Optional[torch.dtype] = None) -> None:
    """``actual`` against the float64 reference cast to its dtype, with
    :func:`torch_sdpa_tolerances` (as PyTorch's tests call ``assertEqual``)."""
    atol, rtol = torch_sdpa_tolerances(ref_hi, ref_lowp, fudge, dtype)
    torch.testing.assert_close(actual, ref_hi.detach().to(actual.dtype), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{name} (PyTorch rule, fudge {fudge}): {m}")


def assert_flash_rule(actual: torch.Tensor, ref: torch.Tensor, ref_pt: torch.Tensor,
                      factor: float = 2.0, name: str = "output", roundings: int = 1) -> None:
    """FlashAttention's tests/test_flash_attn.py rule: ``max |actual - ref| <= factor *
    max |ref_pt - ref|``, ``ref`` computed in higher precision and ``ref_pt`` as plain PyTorch
    computes in the input dtype, plus one unit in the last place (``actual``'s dtype) of the
    larger of the reference's largest value and 1, so that a case whose same-dtype reference
    happens to be exact (a gradient that is 0 for a single key) does not demand bit equality;
    ``roundings`` units for a value that ``actual``'s own dtype accumulates over that many terms
    (a softmax over S keys and a mean over L queries computed in float32: L + S), the bound of
    such a sum's rounding whatever the order."""
    a, r, p = (t.detach().double() for t in (actual, ref, ref_pt))
    if a.shape != r.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != reference {tuple(r.shape)}")
    if not a.numel():
        return
    if not torch.equal(torch.isnan(a), torch.isnan(r)):
        raise AssertionError(f"{name}: NaN pattern differs from the reference")
    a, r, p = (torch.nan_to_num(t, nan=0.0) for t in (a, r, p))
    err = (a - r).abs().max().item()
    pt_err = (p - r).abs().max().item()
    ulp = roundings * torch.finfo(actual.dtype).eps * max(r.abs().max().item(), 1.0)
    if not err <= factor * pt_err + ulp:
        raise AssertionError(f"{name} (FlashAttention rule): max error {err:.3g} > {factor} x the same-dtype "
                             f"reference's {pt_err:.3g} + {ulp:.3g}")


_TERM_LAYERS = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


class GradTerms:
    """Records, for every Conv2d, Linear and BatchNorm layer of ``module``, each call's input and
    the gradient that reaches its output, so the terms its parameter gradients sum can be
    compared between two runs (:func:`term_error_bounds`). Attach before the forward pass."""

    def __init__(self, module: nn.Module):
        self.calls: Dict[str, List[dict]] = {}
        self.layers = {n: m for n, m in module.named_modules() if isinstance(m, _TERM_LAYERS)}
        for name, m in self.layers.items():
            m.register_forward_hook(self._record(name))

    def _record(self, name):
        def hook(m, inputs, out):
            x = inputs[0].detach()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))  # what the layer multiplies
            rec = {"x": x.double(), "training": m.training}
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                dims = [d for d in range(x.dim()) if d != 1]
                use_batch = m.training or m.running_mean is None
                mean = x.double().mean(dims, keepdim=True) if use_batch else m.running_mean.double().view(1, -1, *[1] * (x.dim() - 2))
                var = (x.double().var(dims, keepdim=True, unbiased=False) if use_batch
                       else m.running_var.double().view(1, -1, *[1] * (x.dim() - 2)))
                rec["xhat"] = (x.double() - mean) / torch.sqrt(var + m.eps)
            self.calls.setdefault(name, []).append(rec)
            if out.requires_grad:
                out.register_hook(lambda g: rec.__setitem__("dy", g.detach().double()))
        return hook


def term_error_bounds(high: GradTerms, same: GradTerms) -> Dict[str, torch.Tensor]:
    """For each parameter (``module.named_parameters()`` names) of the recorded layers:
    ``sum over terms of |term_same - term_high|``, bounded through
    ``|a'b' - ab| <= |a' - a| |b'| + |a| |b' - b|`` for the products a weight's terms are, summed
    over every call of the layer. ``high`` and ``same`` are recorders of the high-precision and
    the same-dtype reference runs of the same module (same layer names, same calls)."""
    out: Dict[str, torch.Tensor] = {}

    def add(name, value):
        out[name] = out[name] + value if name in out else value

    for name, m in high.layers.items():
        for h, s in zip(high.calls.get(name, []), same.calls.get(name, [])):
            if "dy" not in h or "dy" not in s:
                continue
            d_dy, dy_h = (s["dy"] - h["dy"]).abs(), h["dy"].abs()
            pre = f"{name}." if name else ""
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if not isinstance(getattr(m, "act", nn.Identity()), nn.Identity):
                    continue  # a fused norm + activation (timm BatchNormAct2d): dy is past the act
                dims = [d for d in range(d_dy.dim()) if d != 1]
                if m.weight is not None:
                    add(pre + "weight", (d_dy * s["xhat"].abs() + dy_h * (s["xhat"] - h["xhat"]).abs()).sum(dims))
                if m.bias is not None:
                    add(pre + "bias", d_dy.sum(dims))
                continue
            x_s, d_x = s["x"].abs(), (s["x"] - h["x"]).abs()
            if isinstance(m, nn.Linear):
                w = (d_dy.reshape(-1, d_dy.shape[-1]).T @ x_s.reshape(-1, x_s.shape[-1])
                     + dy_h.reshape(-1, dy_h.shape[-1]).T @ d_x.reshape(-1, d_x.shape[-1]))
                bias_dims = list(range(d_dy.dim() - 1))
            else:
                grad_w = torch.nn.grad.conv2d_weight
                kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
                if isinstance(m.padding, str) or m.padding_mode != "zeros":
                    continue  # no closed form here: the plain rule applies
                w = grad_w(x_s, m.weight.shape, d_dy, **kw) + grad_w(d_x, m.weight.shape, dy_h, **kw)
                bias_dims = [0, 2, 3]
            add(pre + "weight", w)
            if m.bias is not None:
                add(pre + "bias", d_dy.sum(bias_dims))
    return out
