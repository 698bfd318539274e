"""The gating primitives' torch.library registration: schema, fake (meta) implementations and
autograd formulas, checked with torch.library.opcheck on the C++ backend."""
import pytest
import torch

from attnkern.ops import gating  # noqa: F401  (registers torch.ops.attnkern.*)
from attnkern.reference import gating as ref
from tests.cases import make_input


def _inputs(layout="contiguous", dtype=torch.float32, requires_grad=False):
    torch.manual_seed(0)
    x = make_input((2, 6, 5, 3), layout, dtype).requires_grad_(requires_grad)
    gc = torch.sigmoid(torch.randn(2, 6)).requires_grad_(requires_grad)
    gs = torch.sigmoid(torch.randn(2, 15)).requires_grad_(requires_grad)
    return x, gc, gs


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_forward_primitives(layout):
    x, gc, gs = _inputs(layout, requires_grad=True)
    torch.library.opcheck(torch.ops.attnkern.channel_stats.default, (x, "cpu"))
    torch.library.opcheck(torch.ops.attnkern.spatial_stats.default, (x, gc, "cpu"))
    torch.library.opcheck(torch.ops.attnkern.gate_apply.default, (x, gc, gs, "cpu"))
    torch.library.opcheck(torch.ops.attnkern.gate_apply.default, (x, gc, None, "cpu"))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward_primitives(layout):
    x, gc, gs = _inputs(layout)
    dout = torch.randn_like(x)
    _, smax, scount = ref.spatial_stats(x, gc)
    _, cmax, ccount = ref.channel_stats(x)
    d2, d15 = torch.randn(2, 6), torch.randn(2, 15)
    torch.library.opcheck(torch.ops.attnkern.gate_bwd_a.default, (dout, x, gc, gs, "cpu"))
    torch.library.opcheck(torch.ops.attnkern.cbam_bwd_b.default, (x, gc, smax, scount, d15, d15, "cpu"))
    torch.library.opcheck(torch.ops.attnkern.gate_bwd_c.default,
                          (x, dout, gc, gs, smax, scount, d15, d15, cmax, ccount, d2, d2, "cpu"))


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
    out = chain(lambda x: ops.channel_stats(x, "cpu"), lambda x, g: ops.spatial_stats(x, g, "cpu"),
                lambda x, g, s: ops.gate_apply(x, g, s, "cpu"))

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
