"""attnkern::spatial_conv (CBAM's spatial-attention convolution) against its reference: the
C++ kernels under every vector ISA this CPU runs, forward and both gradients, every layout and
dtype; its registration (schema, fake kernel, autograd formula); its argument checks; and the
CBAM module's use of it."""
import pytest
import torch
import torch.nn.functional as F

from attnkern import _cpu
from attnkern.ops import spatial_conv as sc  # registers torch.ops.attnkern.spatial_conv*
from attnkern.reference import spatial_conv as ref
from tests.backends import assert_registered_with_cpu_kernels
from tests.cases import make_input
from tests.tolerance import assert_close

ops = torch.ops.attnkern

# (B, H, W, k): batch 1, non-square, odd sizes, maps smaller than the kernel, more rows than one
# task's block (16) and rows of more than four vectors (the kernel's register block), k 1 to 7
CASES = [(1, 16, 16, 7), (2, 5, 37, 3), (3, 19, 8, 7), (1, 1, 1, 7), (2, 7, 9, 5), (1, 9, 70, 7),
         (2, 33, 17, 7), (1, 3, 50, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def cpp_kernels():
    return _cpu.require()  # CI builds the C++ kernels: a missing build fails, it does not skip


def _case(B, H, W, k, layout, dtype, seed=0):
    s = make_input((B, 2, H, W), layout, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(1, 2, k, k, generator=g).to(dtype)
    grad = torch.randn(B, 1, H, W, generator=g).to(dtype)
    return s, w, grad


def _high(t):
    return t.double() if t.dtype == torch.float32 else t.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("B,H,W,k", CASES, ids=lambda v: str(v))
def test_matches_reference_every_isa(B, H, W, k, layout, dtype):
    s, w, grad = _case(B, H, W, k, layout, dtype)
    hi = [_high(t) for t in (s, w, grad)]
    want = ref.spatial_conv(hi[0], hi[1])
    want_lowp = F.conv2d(s, w, padding=k // 2)
    want_gs, want_gw = ref.spatial_conv_backward(hi[2], hi[0], hi[1], True, True)
    lowp_gs, lowp_gw = torch.ops.aten.convolution_backward(
        grad, s, w, None, [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], 1, [True, True, False])[:2]
    before = _cpu.cpu_capability()
    try:
        for cap in _cpu.cpu_capabilities():
            _cpu.set_cpu_capability(cap)
            out = ops.spatial_conv(s, w)
            assert out.shape == (B, 1, H, W) and out.dtype == dtype
            assert_close(out, want, want_lowp, name=f"{cap} out")
            gs, gw = ops.spatial_conv_backward(grad, s, w, True, True)
            assert gs.shape == s.shape and gw.shape == w.shape and gs.dtype == gw.dtype == dtype
            assert_close(gs, want_gs, lowp_gs, grad=True, name=f"{cap} grad_s")
            assert_close(gw, want_gw, lowp_gw, grad=True, name=f"{cap} grad_weight")
            only_s, none_w = ops.spatial_conv_backward(grad, s, w, True, False)
            assert none_w.numel() == 0 and torch.equal(only_s, gs)
            none_s, only_w = ops.spatial_conv_backward(grad, s, w, False, True)
            assert none_s.numel() == 0 and torch.equal(only_w, gw)
    finally:
        _cpu.set_cpu_capability(before)


def test_float64_gradcheck():
    s = torch.randn(2, 2, 6, 19, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sc.spatial_conv, (s, w))


@pytest.mark.parametrize("grad_kind", ["expanded", "transposed", "sliced"])
def test_backward_reads_grad_out_through_its_strides(grad_kind):
    """The autograd formula hands grad_out to the kernel as autograd gives it: sum()'s stride-0
    expansion, a transposed view, a slice of a wider tensor."""
    B, H, W, k = 2, 9, 13, 7
    s, w, _ = _case(B, H, W, k, "contiguous", torch.float64)
    g = torch.Generator().manual_seed(7)
    grad = {"expanded": torch.tensor(0.75, dtype=torch.float64).expand(B, 1, H, W),
            "transposed": torch.randn(B, 1, W, H, generator=g, dtype=torch.float64).transpose(2, 3),
            "sliced": torch.randn(B, 1, H, 2 * W, generator=g, dtype=torch.float64)[..., ::2]}[grad_kind]
    assert not grad.is_contiguous()
    s.requires_grad_()
    w.requires_grad_()
    gs, gw = torch.autograd.grad(sc.spatial_conv(s, w), (s, w), grad)
    want_gs, want_gw = ref.spatial_conv_backward(grad.contiguous(), s.detach(), w.detach(), True, True)
    torch.testing.assert_close(gs, want_gs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, want_gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    s, w, grad = _case(2, 5, 7, 3, layout, torch.float32)
    torch.library.opcheck(ops.spatial_conv.default, (s.requires_grad_(), w.requires_grad_()))
    torch.library.opcheck(ops.spatial_conv_backward.default, (grad, s.detach(), w.detach(), True, True))
    torch.library.opcheck(ops.spatial_conv_backward.default, (grad, s.detach(), w.detach(), False, True))


def test_schemas_and_kernels():
    assert_registered_with_cpu_kernels(sc.SCHEMAS)


def test_compiles_without_graph_breaks():
    s, w, _ = _case(2, 9, 11, 7, "contiguous", torch.float32)
    s.requires_grad_()
    w.requires_grad_()
    fn = torch.compile(lambda a, b: sc.spatial_conv(a, b).sin(), fullgraph=True, backend="aot_eager")
    out = fn(s, w)
    torch.testing.assert_close(out, F.conv2d(s, w, padding=3).sin(), atol=1e-5, rtol=1e-5)
    gs, gw = torch.autograd.grad(out.sum(), (s, w))
    rs, rw = torch.autograd.grad(F.conv2d(s, w, padding=3).sin().sum(), (s, w))
    torch.testing.assert_close(gs, rs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("s_shape,w_shape,dtypes,match", [
    ((2, 3, 5, 5), (1, 2, 3, 3), (torch.float32, torch.float32), r"s must be \[B, 2, H, W\]"),
    ((2, 2, 5), (1, 2, 3, 3), (torch.float32, torch.float32), r"s must be \[B, 2, H, W\]"),
    ((2, 2, 5, 5), (1, 2, 4, 4), (torch.float32, torch.float32), r"weight must be \[1, 2, k, k\] with k odd"),
    ((2, 2, 5, 5), (2, 2, 3, 3), (torch.float32, torch.float32), r"weight must be \[1, 2, k, k\] with k odd"),
    ((2, 2, 5, 5), (1, 2, 3, 3), (torch.float32, torch.float64), r"weight must have s's dtype"),
])
def test_rejects_bad_arguments(s_shape, w_shape, dtypes, match):
    s, w = torch.randn(s_shape, dtype=dtypes[0]), torch.randn(w_shape, dtype=dtypes[1])
    with pytest.raises(ValueError, match=match):
        sc.spatial_conv(s, w)
    with pytest.raises(RuntimeError, match=match):
        ops.spatial_conv(s, w)


def test_kernel_rejects_bad_grad_and_dtypes():
    s, w = torch.randn(2, 2, 5, 5), torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[B, 1, H, W\]"):
        ops.spatial_conv_backward(torch.randn(2, 2, 5, 5), s, w, True, True)
    with pytest.raises(RuntimeError, match="grad_out must have s's dtype"):
        ops.spatial_conv_backward(torch.randn(2, 1, 5, 5, dtype=torch.float64), s, w, True, True)
    with pytest.raises(RuntimeError, match="s must be float32, float64, bfloat16 or float16"):
        ops.spatial_conv(s.int(), w.int())
    with pytest.raises(RuntimeError, match="s must not be empty"):
        ops.spatial_conv(torch.randn(0, 2, 5, 5), w)


def test_cbam_spatial_branch_runs_the_kernel_and_matches_conv2d():
    import attnkern

    m = attnkern.CBAM(32).eval()
    s = torch.randn(3, 2, 9, 13)
    conv = m.spatial.conv
    with torch.autograd.profiler.profile() as prof:
        out = conv(s)
    assert any(e.name == "attnkern::spatial_conv" for e in prof.function_events)
    torch.testing.assert_close(out, conv.bn(conv.conv(s)), atol=1e-5, rtol=1e-5)
    # a hook on the convolution keeps the module call (the hook sees it)
    seen = []
    h = conv.conv.register_forward_hook(lambda mod, inp, o: seen.append(o))
    try:
        torch.testing.assert_close(conv(s), out, atol=1e-5, rtol=1e-5)
    finally:
        h.remove()
    assert len(seen) == 1
