"""The fused SE op on every backend against the reference, on the shared case matrix."""
import copy

import pytest
import torch
from timm.layers.squeeze_excite import SEModule

from attnkern.compare import saved_bytes
from attnkern.nn import SqueezeExcite
from tests.cases import all_cases, make_input
from tests.ops.blocks import compare, run as _run
from tests.ops.test_cbam import backend  # noqa: F401  (the backend fixture)
from tests.tolerance import assert_close


@pytest.mark.parametrize("variant", ["plain", "maxpool-hardsigmoid"])
@pytest.mark.parametrize("shape,layout,dtype", all_cases())
def test_se_matches_reference(backend, shape, layout, dtype, variant):
    torch.manual_seed(0)
    kw = dict(add_maxpool=True, gate_layer="hard_sigmoid") if variant != "plain" else {}
    ref_m = SEModule(shape[1], **kw).train()
    ours = SqueezeExcite.from_timm(copy.deepcopy(ref_m)).to(dtype)
    x = make_input(shape, layout, dtype)
    g = make_input(shape, "contiguous", dtype, seed=1)
    out = compare(ours, ref_m, x, g, dtype, [n for n, _ in ours.named_parameters()])
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_se_gradcheck_float64(backend):
    if backend == "triton":
        pytest.skip("float64 gradcheck runs on the C++ backend")
    torch.manual_seed(1)
    m = SqueezeExcite(12, rd_channels=4, add_maxpool=True).double()
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


def test_se_deterministic(backend):
    torch.manual_seed(2)
    m = SqueezeExcite(72)
    x = make_input((2, 72, 13, 11), "channels_last", torch.float32)
    g = make_input((2, 72, 13, 11), "channels_last", torch.float32, seed=3)
    a = _run(copy.deepcopy(m), x, g)
    b = _run(copy.deepcopy(m), x, g)
    assert torch.equal(a[0], b[0]) and all(torch.equal(p, q) for p, q in zip(a[1], b[1]))


def test_se_saved_for_backward_is_about_one_input(backend):
    m = SqueezeExcite(256)
    x = make_input((2, 256, 28, 28), "contiguous", torch.float32).requires_grad_()
    saved = saved_bytes(m, x)
    assert saved <= 1.05 * x.numel() * x.element_size()


def test_se_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("ATTNKERN_BACKEND", "cpu")
    torch.manual_seed(4)
    block = torch.nn.Sequential(torch.nn.Conv2d(8, 24, 3, padding=1), SqueezeExcite(24)).train()
    cf = torch.compile(copy.deepcopy(block), fullgraph=True)
    x = make_input((2, 8, 9, 7), "contiguous", torch.float32)
    g = make_input((2, 24, 9, 7), "contiguous", torch.float32, seed=1)
    out, grads = _run(block, x, g)
    c_out, c_grads = _run(cf, x, g)
    assert_close(c_out, out, name="out")
    for i, (a, b) in enumerate(zip(c_grads, grads)):
        assert_close(a, b, name=f"grad {i}")
