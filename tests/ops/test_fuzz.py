"""Property tests (hypothesis) of the three gating blocks on every backend.

Each example draws a shape (sizes of 1, primes, non-multiples of the vector width), a dtype
(float32, bfloat16, float16, float64), the way the input is laid out in memory (NCHW,
channels_last, a slice of a larger tensor, a permuted view, a strided step, a batch expanded
from one sample with stride 0), BatchNorm in train or eval mode, inputs with many ties or not,
and the block's options; the block runs forward and backward through that view, and the output,
the gradient of the tensor the view was cut from and every parameter gradient must equal the
pure-PyTorch reference (attnkern.reference.*) under tests/tolerance.py's rule.

Backends are forced with ATTNKERN_BACKEND: the C++ kernels ("cpu"), the Triton kernels under
the interpreter ("triton": few, tiny examples, it is slow) and the reference itself through the
functional API ("reference"). Example counts are bounded and derandomized, so the file runs
the same examples every time, in well under three minutes on a 2-core machine.
"""
from __future__ import annotations

import copy
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attnkern.nn import BAM, CBAM, SqueezeExcite
from attnkern.reference import bam as ref_bam
from attnkern.reference import cbam as ref_cbam
from attnkern.reference import se as ref_se
from tests.tolerance import GradTerms, assert_close, term_error_bounds

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "sliced", "permuted", "step", "expanded"]

# (max examples, channel choices, spatial choices) per backend: the interpreter is slow.
BUDGET = {
    "cpu": (150, [1, 2, 3, 5, 8, 13, 16, 17, 31, 37, 64], [1, 2, 3, 5, 7, 11, 13, 17]),
    "reference": (25, [1, 3, 8, 17], [1, 2, 5, 7]),
    "triton": (20, [1, 3, 5, 8, 17], [1, 2, 3, 5, 7]),
}


def _settings(backend: str):
    return settings(max_examples=BUDGET[backend][0], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def cases(draw, backend: str):
    _, cs, hws = BUDGET[backend]
    return dict(
        B=draw(st.sampled_from([1, 2, 3])),
        C=draw(st.sampled_from(cs)),
        H=draw(st.sampled_from(hws)),
        W=draw(st.sampled_from(hws)),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        train=draw(st.booleans()),
        ties=draw(st.booleans()),
        seed=draw(st.integers(0, 2**20)),
    )


# ------------------------------------------------------------------------------------------
# inputs as views of a leaf tensor
# ------------------------------------------------------------------------------------------

def make_leaf(case) -> torch.Tensor:
    """The tensor the input view is cut from (random, in the case's dtype)."""
    B, C, H, W = case["B"], case["C"], case["H"], case["W"]
    shape = {
        "contiguous": (B, C, H, W),
        "channels_last": (B, C, H, W),
        "sliced": (B, C + 3, H, W + 2),
        "permuted": (B, C, W, H),
        "step": (B, C, 2 * H, W),
        "expanded": (1, C, H, W),
    }[case["layout"]]
    g = torch.Generator().manual_seed(case["seed"])
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if case["ties"]:  # few distinct values: maxima tie along both axes
        t = torch.round(t * 2) / 2
    t = t.to(case["dtype"])
    if case["layout"] == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def view_of(leaf: torch.Tensor, case) -> torch.Tensor:
    """The [B, C, H, W] input the block sees, as a view of ``leaf`` (autograd flows back)."""
    B, C, H, W = case["B"], case["C"], case["H"], case["W"]
    lay = case["layout"]
    if lay in ("contiguous", "channels_last"):
        v = leaf
    elif lay == "sliced":
        v = leaf[:, 2:C + 2, :, 1:W + 1]
    elif lay == "permuted":
        v = leaf.transpose(2, 3)
    elif lay == "step":
        v = leaf[:, :, ::2, :]
    else:
        v = leaf.expand(B, C, H, W)
    assert v.shape == (B, C, H, W)
    return v


def run_view(module, leaf, case, g):
    """Output, and the gradients of the leaf and of every parameter, of ``module`` on the view."""
    leaf = leaf.detach().clone().requires_grad_()
    x = view_of(leaf, case)
    out = module(x)
    out.backward(g)
    return out, [leaf.grad] + [p.grad for p in module.parameters()]


def check_block(ours, ref_module, case):
    """``ours`` (in the case's dtype) against ``ref_module`` (float32 weights, the reference
    math) run in the higher precision and in the case's dtype, through the same view."""
    dtype = case["dtype"]
    leaf = make_leaf(case)
    B, C, H, W = case["B"], case["C"], case["H"], case["W"]
    g = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(case["seed"] + 1)).to(dtype)

    out, grads = run_view(ours, leaf, case, g)
    hi = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    hi_module = copy.deepcopy(ref_module).to(hi)
    rec_hi = GradTerms(hi_module)
    h_out, h_grads = run_view(hi_module, leaf.to(hi), case, g.to(hi))
    if dtype == torch.float64:
        s_out, s_grads, terms = None, [None] * len(h_grads), {}
    else:
        same_module = copy.deepcopy(ref_module).to(dtype)
        rec_same = GradTerms(same_module)
        s_out, s_grads = run_view(same_module, leaf, case, g)
        terms = term_error_bounds(rec_hi, rec_same)

    x = view_of(leaf, case)
    assert out.dtype == dtype and out.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last not kept"
    assert_close(out, h_out, s_out, dtype=dtype, name="out")
    assert_close(grads[0], h_grads[0], s_grads[0], dtype=dtype, grad=True, name="d(leaf)")
    scale = max(float(gr.abs().max()) for gr in h_grads[1:])
    names = [n for n, _ in ours.named_parameters()]
    for i, name in enumerate(names, start=1):
        assert_close(grads[i], h_grads[i], s_grads[i], dtype=dtype, grad=True, name=name, scale=scale,
                     terms=terms.get(name))


def forced(backend: str):
    """Force ATTNKERN_BACKEND inside one hypothesis example (a context manager: a
    function-scoped monkeypatch fixture would not reset between examples)."""
    return mock.patch.dict(os.environ, {"ATTNKERN_BACKEND": backend})


BACKENDS = ["cpu", "triton", "reference"]


def _seed_params(m: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights, BatchNorm affines and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                mod.bias.copy_(0.2 * torch.randn(n, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))


# ------------------------------------------------------------------------------------------
# CBAM
# ------------------------------------------------------------------------------------------

class RefCBAM(torch.nn.Module):
    def __init__(self, m: CBAM):
        super().__init__()
        self.m = m

    def forward(self, x):
        return ref_cbam.cbam(x, self.m.channel, self.m.spatial, pool_order=self.m.pool_order,
                             gate=self.m.channel.gate)[0]


# Discontinuities: where the reference in high precision and a kernel fed low-precision gates
# land on different sides of a max or a hard-sigmoid kink, the gradient jumps by design, so
# examples that come that close are discarded (no fixed tolerance can cover a jump).
KINK_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _near_kink(logits: torch.Tensor, gate: str, dtype) -> bool:
    if gate != "hard_sigmoid":
        return False
    tol = KINK_TOL[dtype] * 3
    return bool(((logits.abs() - 3).abs() < tol).any())


def _near_tie(y: torch.Tensor, dim: int, dtype) -> bool:
    """True if along ``dim`` the largest two values differ by less than the tolerance (but are
    not exactly equal zeros, which tie in every precision)."""
    if y.shape[dim] < 2:
        return False
    top = y.topk(2, dim=dim).values
    gap = (top.select(dim, 0) - top.select(dim, 1)).abs()
    mag = top.select(dim, 0).abs()
    return bool(((gap <= KINK_TOL[dtype] * mag) & ~((gap == 0) & (mag == 0))).any())


def _cbam_discontinuous(base: CBAM, case, gate: str) -> bool:
    m = copy.deepcopy(base).double()
    x = view_of(make_leaf(case), case).double()
    with torch.no_grad():
        logits = m.channel(x.mean((2, 3))) + m.channel(x.amax((2, 3)))
        gc = m.channel.gate(logits)
        y = x * gc[:, :, None, None]
        maps = [y.mean(1, keepdim=True), y.amax(1, keepdim=True)]
        s = m.spatial(torch.cat(maps if base.pool_order == "mean_max" else maps[::-1], 1))
    dt = case["dtype"]
    return _near_kink(logits, gate, dt) or _near_kink(s, gate, dt) or _near_tie(y, 1, dt)


def _cbam_case(backend):
    return st.tuples(cases(backend), st.sampled_from([1, 3, 7]), st.booleans(),
                     st.sampled_from(["mean_max", "max_mean"]), st.sampled_from(["sigmoid", "hard_sigmoid"]))


def _check_cbam(backend, args):
    case, k, bias, order, gate = args
    B, H, W = case["B"], case["H"], case["W"]
    assume(not (case["train"] and B * H * W == 1))  # BatchNorm cannot train on one value
    torch.manual_seed(case["seed"])
    base = CBAM(case["C"], rd_channels=max(1, case["C"] // 4), spatial_kernel_size=k, mlp_bias=bias,
                pool_order=order, gate_layer=gate).train(case["train"])
    _seed_params(base, case["seed"])
    assume(not _cbam_discontinuous(base, case, gate))
    with forced(backend):
        check_block(copy.deepcopy(base).to(case["dtype"]), RefCBAM(copy.deepcopy(base)), case)


@_settings("cpu")
@given(args=_cbam_case("cpu"))
def test_cbam_cpu(args):
    _check_cbam("cpu", args)


@_settings("triton")
@given(args=_cbam_case("triton"))
def test_cbam_triton(args):
    _check_cbam("triton", args)


@_settings("reference")
@given(args=_cbam_case("reference"))
def test_cbam_reference(args):
    _check_cbam("reference", args)


# ------------------------------------------------------------------------------------------
# squeeze-and-excitation
# ------------------------------------------------------------------------------------------

class RefSE(torch.nn.Module):
    def __init__(self, m: SqueezeExcite):
        super().__init__()
        self.m = m

    def forward(self, x):
        return ref_se.squeeze_excite(x, self.m.mlp, gate=self.m._gate(), add_maxpool=self.m.add_maxpool)[0]


def _se_case(backend):
    return st.tuples(cases(backend), st.sampled_from(["conv", "linear", "conv-bn"]), st.booleans(),
                     st.sampled_from(["sigmoid", "hard_sigmoid"]))


def _check_se(backend, args):
    case, layout, maxpool, gate = args
    norm = torch.nn.BatchNorm2d if layout == "conv-bn" else None
    assume(not (norm and case["train"] and case["B"] == 1))
    torch.manual_seed(case["seed"])
    base = SqueezeExcite(case["C"], rd_channels=max(1, case["C"] // 3), add_maxpool=maxpool,
                         norm_layer=norm, gate_layer=gate,
                         layout="linear" if layout == "linear" else "conv").train(case["train"])
    _seed_params(base, case["seed"])
    with forced(backend):
        check_block(copy.deepcopy(base).to(case["dtype"]), RefSE(copy.deepcopy(base)), case)


@_settings("cpu")
@given(args=_se_case("cpu"))
def test_se_cpu(args):
    _check_se("cpu", args)


@_settings("triton")
@given(args=_se_case("triton"))
def test_se_triton(args):
    _check_se("triton", args)


@_settings("reference")
@given(args=_se_case("reference"))
def test_se_reference(args):
    _check_se("reference", args)


# ------------------------------------------------------------------------------------------
# BAM
# ------------------------------------------------------------------------------------------

class RefBAM(torch.nn.Module):
    def __init__(self, m: BAM):
        super().__init__()
        self.m = m

    def forward(self, x):
        return ref_bam.bam(x, self.m.channel, self.m.spatial, combine=self.m.combine)[0]


def _bam_case(backend):
    return st.tuples(cases(backend), st.sampled_from(["sum", "product"]), st.sampled_from([1, 2]))


def _check_bam(backend, args):
    case, combine, dilation = args
    assume(not (case["train"] and case["B"] == 1))  # BatchNorm1d on the pooled vector
    torch.manual_seed(case["seed"])
    base = BAM(case["C"], rd_channels=max(1, case["C"] // 4), dilation=dilation, num_dilated=1,
               combine=combine).train(case["train"])
    _seed_params(base, case["seed"])
    with forced(backend):
        check_block(copy.deepcopy(base).to(case["dtype"]), RefBAM(copy.deepcopy(base)), case)


@_settings("cpu")
@given(args=_bam_case("cpu"))
def test_bam_cpu(args):
    _check_bam("cpu", args)


@_settings("triton")
@given(args=_bam_case("triton"))
def test_bam_triton(args):
    _check_bam("triton", args)


@_settings("reference")
@given(args=_bam_case("reference"))
def test_bam_reference(args):
    _check_bam("reference", args)


# ------------------------------------------------------------------------------------------
# the views are what they claim to be
# ------------------------------------------------------------------------------------------

def test_views_cover_every_kind_of_stride():
    """The layouts drawn above really are: dense NCHW, dense channels_last, non-dense slices,
    a permuted view dense in neither format, a step, and a batch of stride 0."""
    base = dict(B=2, C=5, H=3, W=4, dtype=torch.float32, ties=False, seed=0)
    seen = {}
    for lay in LAYOUTS:
        case = dict(base, layout=lay)
        v = view_of(make_leaf(case), case)
        seen[lay] = (v.is_contiguous(), v.is_contiguous(memory_format=torch.channels_last), v.stride())
    assert seen["contiguous"][0] and seen["channels_last"][1] and not seen["channels_last"][0]
    for lay in ("sliced", "permuted", "step", "expanded"):
        assert not seen[lay][0] and not seen[lay][1], lay
    assert seen["expanded"][2][0] == 0
