"""The gating ops' registration with the dispatcher: schema, fake (meta) kernels and autograd
formulas, checked with torch.library.opcheck on the C++ kernels (CPU tensors)."""
import pytest
import torch

from attnkern import _cpu
from attnkern.ops import gating  # registers torch.ops.attnkern.*
from attnkern.reference import gating as ref
from tests.cases import make_input


@pytest.fixture(autouse=True, scope="module")
def cpp_kernels():
    return _cpu.require()  # CI builds the C++ kernels: a missing build fails, it does not skip


def _inputs(layout="contiguous", dtype=torch.float32, requires_grad=False):
    torch.manual_seed(0)
    x = make_input((2, 6, 5, 3), layout, dtype).requires_grad_(requires_grad)
    gc = torch.sigmoid(torch.randn(2, 6)).requires_grad_(requires_grad)
    gs = torch.sigmoid(torch.randn(2, 15)).requires_grad_(requires_grad)
    return x, gc, gs


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_forward_primitives(layout):
    x, gc, gs = _inputs(layout, requires_grad=True)
    torch.library.opcheck(torch.ops.attnkern.channel_stats.default, (x,))
    torch.library.opcheck(torch.ops.attnkern.spatial_stats.default, (x, gc))
    torch.library.opcheck(torch.ops.attnkern.gate_apply.default, (x, gc, gs))
    torch.library.opcheck(torch.ops.attnkern.gate_apply.default, (x, gc, None))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward_primitives(layout):
    x, gc, gs = _inputs(layout)
    dout = torch.randn_like(x)
    _, smax, scount = ref.spatial_stats(x, gc)
    _, cmax, ccount = ref.channel_stats(x)
    d2, d15 = torch.randn(2, 6), torch.randn(2, 15)
    torch.library.opcheck(torch.ops.attnkern.gate_apply_backward.default, (dout, x, gc, gs, True, True))
    torch.library.opcheck(torch.ops.attnkern.spatial_stats_backward.default, (x, gc, smax, scount, d15, d15))
    torch.library.opcheck(torch.ops.attnkern.gating_input_grad.default,
                          (x, dout, gc, gs, smax, scount, d15, d15, cmax, ccount, d2, d2))


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gate_apply_residual_registered_autograd(layout, relu):
    """The out-of-place apply with a residual block's add and ReLU: opcheck (schema, fake
    kernel, its autograd formula) and a float64 gradcheck of the formula, with and without gs."""
    x, gc, gs = _inputs(layout, torch.float64)
    x, gc, gs = x.requires_grad_(), gc.double().requires_grad_(), gs.double().requires_grad_()
    r = make_input(x.shape, layout, torch.float64, seed=5).requires_grad_()
    op = torch.ops.attnkern.gate_apply_residual.default
    torch.library.opcheck(op, (x, gc, gs, r, relu))
    assert torch.autograd.gradcheck(lambda *a: op(*a, relu), (x, gc, gs, r), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, None, c, relu), (x, gc, r), eps=1e-6, atol=1e-6)


def test_custom_op_autograd_matches_reference():
    """The compiled path's autograd (each primitive with its own formula) equals autograd of
    the reference primitives' math."""
    x, gc, gs = _inputs(dtype=torch.float64, requires_grad=True)

    def chain(stats_c, stats_s, apply):
        m, mx, _ = stats_c(x)
        g = torch.sigmoid(m + mx) * gc
        sm, smx, _ = stats_s(x, g)
        return apply(x, g, torch.sigmoid(sm - smx) * gs)

    ops = torch.ops.attnkern
    out = chain(ops.channel_stats, ops.spatial_stats, ops.gate_apply)

    def ref_chain():
        xf = x.flatten(2)
        m, mx = xf.mean(2), xf.amax(2)
        g = torch.sigmoid(m + mx) * gc
        y = xf * g.unsqueeze(2)
        s = torch.sigmoid(y.mean(1) - y.amax(1)) * gs
        return (y * s.unsqueeze(1)).view_as(x)

    r = ref_chain()
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (x, gc, gs))
    r_grads = torch.autograd.grad((r * w).sum(), (x, gc, gs))
    torch.testing.assert_close(out, r)
    for a, b in zip(grads, r_grads):
        torch.testing.assert_close(a, b)


def test_schemas_defined_once_agree():
    """The schemas the C++ library defines are the ones ops/gating.py would define without it,
    and no schema takes a backend."""
    for name, schema in gating.SCHEMAS.items():
        got = str(getattr(torch.ops.attnkern, name).default._schema)
        assert got == f"attnkern::{name}{schema}", (got, schema)
        assert "backend" not in got


@pytest.mark.parametrize("name", gating.OPS)
def test_kernel_per_dispatch_key(name):
    """C++ for CPU, Triton for CUDA, the reference for every other device, fake for Meta."""
    qualname = f"attnkern::{name}"
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(qualname, "CPU") and has(qualname, "CUDA") and has(qualname, "Meta")
    assert has(qualname, "CompositeExplicitAutograd")
    cpu = [line for line in torch._C._dispatch_dump(qualname).splitlines() if line.startswith("CPU:")]
    assert len(cpu) == 1 and "csrc/" in cpu[0], cpu  # the C++ kernel, registered from C++


def test_exported_graph_names_ops_without_backend(monkeypatch):
    """torch.export of a block with the kernels forced: the graph calls attnkern's ops with no
    backend or device in their arguments, so it runs wherever the ops have kernels; here it
    runs on CPU and on the Meta device (shapes only)."""
    from attnkern.nn import CBAM

    monkeypatch.setenv("ATTNKERN_BACKEND", "cpu")
    torch.manual_seed(0)
    m = CBAM(8).eval()
    x = make_input((2, 8, 5, 3), "contiguous", torch.float32)
    ep = torch.export.export(m, (x,))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("attnkern.")]
    assert {str(n.target).split(".")[1] for n in calls} >= {"channel_stats", "spatial_stats", "gate_apply"}
    for n in calls:
        assert all(not isinstance(a, str) for a in n.args), n
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x))
        meta = ep.module().to("meta")(x.to("meta"))
    assert meta.shape == x.shape and meta.device.type == "meta"


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("block", ["se", "cbam", "bam"])
def test_blocks_without_autograd_match_the_autograd_path(monkeypatch, block, mode):
    # Without autograd the blocks call the primitives directly (under torch.no_grad below the
    # dispatcher's autograd layer): the same kernels, so the same values, and nothing recorded.
    from attnkern.nn import BAM, CBAM, SqueezeExcite

    monkeypatch.setenv("ATTNKERN_BACKEND", "cpu")
    torch.manual_seed(0)
    m = {"se": SqueezeExcite, "cbam": CBAM, "bam": BAM}[block](16).eval()
    x = make_input((2, 16, 7, 5), "channels_last", torch.float32).requires_grad_()
    expected = m(x)
    assert expected.requires_grad
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        got = m(x)
    assert not got.requires_grad and got.grad_fn is None
    assert torch.equal(got, expected.detach())
