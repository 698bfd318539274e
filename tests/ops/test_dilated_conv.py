"""attnkern::dilated_conv (BAM's dilated convolutions) against its reference: the C++ kernels
under every vector ISA this CPU runs, forward and the three gradients, every layout and dtype,
with and without a bias; its registration (schema, fake kernel, autograd formula); its argument
checks."""
import pytest
import torch
import torch.nn.functional as F

from attnkern import _cpu
from attnkern.ops import dilated_conv as dc  # registers torch.ops.attnkern.dilated_conv*
from attnkern.reference import dilated_conv as ref
from tests.backends import assert_registered_with_cpu_kernels
from tests.cases import make_input
from tests.tolerance import assert_close

ops = torch.ops.attnkern

# (B, C, C_out, H, W, k, d, bias): BAM's 3x3 at dilation 4 on 4 and 8 channels, batch 1,
# non-square and odd sizes, maps smaller than the dilated window, more rows than one task's
# block (16), rows of more than four vectors, channels in != out, k 1 to 5, dilation 1 to 7
CASES = [(1, 4, 4, 16, 16, 3, 4, True), (2, 3, 5, 9, 37, 3, 2, False), (3, 8, 8, 19, 8, 3, 4, True),
         (1, 1, 1, 1, 1, 3, 4, True), (2, 4, 4, 33, 17, 3, 1, False), (1, 2, 3, 9, 70, 5, 3, True),
         (2, 16, 16, 7, 9, 3, 4, True), (1, 5, 1, 3, 50, 1, 7, False)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def cpp_kernels():
    return _cpu.require()  # CI builds the C++ kernels: a missing build fails, it does not skip


def _case(B, C, C_out, H, W, k, bias, layout, dtype, seed=0):
    x = make_input((B, C, H, W), layout, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(C_out, C, k, k, generator=g) / (C * k)).to(dtype)
    b = torch.randn(C_out, generator=g).to(dtype) if bias else None
    grad = torch.randn(B, C_out, H, W, generator=g).to(dtype)
    return x, w, b, grad


def _high(t):
    if t is None:
        return None
    return t.double() if t.dtype == torch.float32 else t.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("B,C,C_out,H,W,k,d,bias", CASES, ids=lambda v: str(v))
def test_matches_reference_every_isa(B, C, C_out, H, W, k, d, bias, layout, dtype):
    x, w, b, grad = _case(B, C, C_out, H, W, k, bias, layout, dtype)
    hi = [_high(t) for t in (x, w, b, grad)]
    p = d * (k // 2)
    want = ref.dilated_conv(hi[0], hi[1], hi[2], d)
    want_lowp = F.conv2d(x, w, b, padding=p, dilation=d)
    mask = [True, True, bias]
    want_g = ref.dilated_conv_backward(hi[3], hi[0], hi[1], d, mask)
    lowp_g = torch.ops.aten.convolution_backward(grad, x, w, [C_out], [1, 1], [p, p], [d, d], False, [0, 0], 1, mask)
    before = _cpu.cpu_capability()
    try:
        for cap in _cpu.cpu_capabilities():
            _cpu.set_cpu_capability(cap)
            out = ops.dilated_conv(x, w, b, d)
            assert out.shape == (B, C_out, H, W) and out.dtype == dtype and out.is_contiguous()
            assert_close(out, want, want_lowp, name=f"{cap} out")
            got = ops.dilated_conv_backward(grad, x, w, d, mask)
            assert [t.shape for t in got[:2]] == [x.shape, w.shape] and all(t.dtype == dtype for t in got)
            for name, t, want_t, lowp_t in zip(("grad_x", "grad_weight", "grad_bias"), got, want_g, lowp_g):
                if name == "grad_bias" and not bias:
                    assert t.numel() == 0
                    continue
                assert_close(t, want_t, lowp_t, grad=True, name=f"{cap} {name}")
            only_x = ops.dilated_conv_backward(grad, x, w, d, [True, False, False])
            assert only_x[1].numel() == only_x[2].numel() == 0 and torch.equal(only_x[0], got[0])
            only_w = ops.dilated_conv_backward(grad, x, w, d, [False, True, False])
            assert only_w[0].numel() == only_w[2].numel() == 0 and torch.equal(only_w[1], got[1])
    finally:
        _cpu.set_cpu_capability(before)


@pytest.mark.parametrize("bias", [True, False])
def test_float64_gradcheck(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 11, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda *a: dc.dilated_conv(*a, 2), (x, w, b))


@pytest.mark.parametrize("grad_kind", ["expanded", "channels_last", "sliced"])
def test_backward_reads_grad_out_through_its_strides(grad_kind):
    B, C, H, W = 2, 4, 9, 13
    x, w, b, _ = _case(B, C, C, H, W, 3, True, "contiguous", torch.float64)
    g = torch.Generator().manual_seed(7)
    grad = {"expanded": torch.tensor(0.75, dtype=torch.float64).expand(B, C, H, W),
            "channels_last": torch.randn(B, C, H, W, generator=g, dtype=torch.float64).contiguous(
                memory_format=torch.channels_last),
            "sliced": torch.randn(B, C, H, 2 * W, generator=g, dtype=torch.float64)[..., ::2]}[grad_kind]
    assert not grad.is_contiguous()
    for t in (x, w, b):
        t.requires_grad_()
    got = torch.autograd.grad(dc.dilated_conv(x, w, b, 4), (x, w, b), grad)
    want = ref.dilated_conv_backward(grad.contiguous(), x.detach(), w.detach(), 4, [True, True, True])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x, w, b, grad = _case(2, 3, 4, 5, 7, 3, True, layout, torch.float32)
    torch.library.opcheck(ops.dilated_conv.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 2))
    torch.library.opcheck(ops.dilated_conv.default, (x.detach(), w.detach(), None, 2))
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(ops.dilated_conv_backward.default, (grad, x.detach(), w.detach(), 2, mask))


def test_schemas_and_kernels():
    assert_registered_with_cpu_kernels(dc.SCHEMAS)


def test_compiles_without_graph_breaks():
    x, w, b, _ = _case(2, 4, 4, 9, 11, 3, True, "contiguous", torch.float32)
    for t in (x, w, b):
        t.requires_grad_()
    fn = torch.compile(lambda a, c, e: dc.dilated_conv(a, c, e, 4).sin(), fullgraph=True, backend="aot_eager")
    out = fn(x, w, b)
    want = F.conv2d(x, w, b, padding=4, dilation=4).sin()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out.sum(), (x, w, b))
    exp = torch.autograd.grad(want.sum(), (x, w, b))
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("x_shape,w_shape,b_shape,dilation,dtypes,match", [
    ((2, 3, 5), (4, 3, 3, 3), None, 1, (torch.float32,) * 3, r"x must be \[B, C, H, W\]"),
    ((2, 3, 5, 5), (4, 2, 3, 3), None, 1, (torch.float32,) * 3, r"weight must be \[C_out, C, k, k\] with C = 3"),
    ((2, 3, 5, 5), (4, 3, 2, 2), None, 1, (torch.float32,) * 3, r"weight must be \[C_out, C, k, k\]"),
    ((2, 3, 5, 5), (4, 3, 3, 3), (3,), 1, (torch.float32,) * 3, r"bias must be \[C_out\] = \[4\]"),
    ((2, 3, 5, 5), (4, 3, 3, 3), None, 1, (torch.float32, torch.float64, torch.float32), r"weight must have x's dtype"),
    ((2, 3, 5, 5), (4, 3, 3, 3), (4,), 1, (torch.float32, torch.float32, torch.float64), r"bias must have x's dtype"),
    ((2, 3, 5, 5), (4, 3, 3, 3), None, 0, (torch.float32,) * 3, r"dilation must be"),
])
def test_rejects_bad_arguments(x_shape, w_shape, b_shape, dilation, dtypes, match):
    x, w = torch.randn(x_shape, dtype=dtypes[0]), torch.randn(w_shape, dtype=dtypes[1])
    b = torch.randn(b_shape, dtype=dtypes[2]) if b_shape else None
    with pytest.raises(ValueError, match=match):
        dc.dilated_conv(x, w, b, dilation)
    with pytest.raises(RuntimeError, match=match):
        ops.dilated_conv(x, w, b, dilation)


def test_kernel_rejects_bad_grad_and_dtypes():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[B, C_out, H, W\]"):
        ops.dilated_conv_backward(torch.randn(2, 3, 5, 5), x, w, 2, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out must have x's dtype"):
        ops.dilated_conv_backward(torch.randn(2, 4, 5, 5, dtype=torch.float64), x, w, 2, [True, True, True])
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        ops.dilated_conv(x.int(), w.int(), None, 1)
    with pytest.raises(RuntimeError, match="x must not be empty"):
        ops.dilated_conv(torch.randn(0, 3, 5, 5), w, None, 1)
