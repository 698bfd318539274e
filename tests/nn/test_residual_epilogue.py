"""A residual block's tail in the attention's apply pass, with autograd (what a patched timm
ResNet block runs in training): ``attnkern.CBAM`` / ``attnkern.SqueezeExcite``'s
``_residual_forward(x, residual, relu)`` against timm's ``act(attn(x) + residual)`` on every
backend, on the shared shapes, NCHW and channels_last, float32 / bfloat16 / float16: the output
and the gradients of x, the residual and every parameter under the tolerance rule; a float64
gradcheck through the eager autograd nodes; the cases it gives way in (hooks, layouts that
differ, a non-dense x) return None."""
import copy

import pytest
import torch
from torch import nn
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule

from attnkern.nn import CBAM, SqueezeExcite
from tests.cases import DTYPES, SHAPES, case_id, make_input
from tests.ops.blocks import compare
from tests.ops.test_cbam import backend  # noqa: F401  (the backend fixture)


class _Tail(nn.Module):
    """``relu?(attn(x) + residual)``, the residual a parameter (so that its gradient is checked);
    ``fused``: through the attention's apply pass."""

    def __init__(self, attn: nn.Module, residual: torch.Tensor, relu: bool, fused: bool):
        super().__init__()
        self.attn = attn
        self.residual = nn.Parameter(residual)
        self.relu, self.fused = relu, fused

    def forward(self, x):
        if self.fused:
            out = self.attn._residual_forward(x, self.residual, self.relu)
            assert out is not None, "the fused tail gave way"
            return out
        y = self.attn(x) + self.residual
        return torch.relu(y) if self.relu else y


def _timm_attention(kind, C, seed=0):
    torch.manual_seed(seed)
    if kind == "se":
        return SEModule(C, rd_ratio=0.25).train()
    m = CbamModule(C, rd_ratio=0.25).train()
    with torch.no_grad():  # a spatial BatchNorm that is not the identity
        m.spatial.conv.bn.weight.fill_(1.3)
        m.spatial.conv.bn.bias.fill_(-0.2)
    return m


def _ours(kind, timm_m):
    return (SqueezeExcite if kind == "se" else CBAM).from_timm(copy.deepcopy(timm_m))


CASES = [pytest.param(s, l, d, id=case_id(s, l, d))
         for s in SHAPES if s[2] * s[3] > 1 for l in ("contiguous", "channels_last") for d in DTYPES]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("shape,layout,dtype", CASES)
@pytest.mark.parametrize("kind", ["se", "cbam"])
def test_fused_tail_matches_timms_tail(backend, kind, shape, layout, dtype, relu):
    if backend == "triton" and shape[2] * shape[3] > 100 and dtype != torch.float32:
        pytest.skip("the Triton kernels run under the interpreter: the large map in float32 only")
    timm_m = _timm_attention(kind, shape[1])
    residual = make_input(shape, layout, torch.float32, seed=7)
    ref = _Tail(timm_m, residual.clone(), relu, fused=False)
    ours = _Tail(_ours(kind, timm_m), residual.clone(), relu, fused=True).to(dtype)
    x = make_input(shape, layout, dtype)
    g = make_input(shape, layout, dtype, seed=1)
    out = compare(ours, ref, x, g, dtype, [n for n, _ in ours.named_parameters()])
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    if relu:
        assert bool((out >= 0).all())


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("kind", ["se", "cbam"])
def test_fused_tail_gradcheck_float64(kind, relu, monkeypatch):
    """Through the eager autograd nodes (the ReLU mask shared by x's, the gates' and the
    residual's gradients) on the C++ kernels."""
    monkeypatch.setenv("ATTNKERN_BACKEND", "cpu")
    m = _ours(kind, _timm_attention(kind, 12, seed=3)).double().eval()
    x = torch.randn(2, 12, 5, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 12, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: m._residual_forward(a, b, relu), (x, r), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["se", "cbam"])
def test_fused_tail_gives_way(kind):
    m = _ours(kind, _timm_attention(kind, 16))
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    r = torch.randn(2, 16, 6, 5)
    assert m._residual_forward(x, r.contiguous(memory_format=torch.channels_last), True) is None  # layouts differ
    assert m._residual_forward(x, r.double(), True) is None  # dtypes differ
    assert m._residual_forward(make_input((2, 16, 6, 5), "sliced", torch.float32), r, True) is None  # not dense
    handle = m.register_forward_hook(lambda *_: None)
    assert m._residual_forward(x, r, True) is None  # a hook expects the module to be called
    handle.remove()
    assert m._residual_forward(x, r, True) is not None
