"""The references are right: the CBAM reference equals timm's CbamModule, and the gating
primitives' backward formulas, composed as the fused op composes them, equal autograd."""
import copy

import pytest
import torch
from timm.layers.cbam import CbamModule

from attnkern.nn import CBAM
from attnkern.ops import cbam as cbam_op
from attnkern.reference import cbam as ref
from attnkern.reference import gating as ref_gating
from tests.cases import make_input
from tests.tolerance import assert_close

SHAPES = [(2, 24, 7, 9), (1, 72, 5, 5), (3, 5, 1, 1)]


def _grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("pool_order", ["mean_max", "max_mean"])
def test_reference_equals_timm(shape, train, pool_order):
    torch.manual_seed(0)
    timm_m = CbamModule(shape[1]).train(train)
    ours = CBAM.from_timm(copy.deepcopy(timm_m))
    if pool_order == "max_mean":  # timm only has mean_max: swap the conv's input channels
        with torch.no_grad():
            w = timm_m.spatial.conv.conv.weight
            ours.spatial.conv.conv.weight.copy_(w.flip(1))
    ours.pool_order = pool_order
    x1 = make_input(shape, "contiguous", torch.float32).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1 = timm_m(x1)
    y2, gc, gs = ref.cbam(x2, ours.channel, ours.spatial, pool_order=pool_order, gate=torch.sigmoid)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert_close(y2, y1, name="out")
    assert gc.shape == shape[:2] and gs.shape == (shape[0], 1, *shape[2:])
    conv_w = ours.spatial.conv.conv.weight
    for i, (p, a, b) in enumerate(zip([x2] + list(ours.parameters()), _grads(ours, x2), _grads(timm_m, x1))):
        if p is conv_w and pool_order == "max_mean":
            a = a.flip(1)
        assert_close(a, b, name=f"grad {i}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_primitive_formulas_compose_to_autograd(shape, train):
    """The fused glue on the reference primitives (pass A, B, C formulas) gives autograd's
    gradients of timm's module."""
    torch.manual_seed(1)
    timm_m = CbamModule(shape[1]).train(train).double()
    ours = CBAM.from_timm(copy.deepcopy(timm_m))
    x1 = make_input(shape, "contiguous", torch.float64).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1 = timm_m(x1)
    y2, _, _ = cbam_op.cbam(x2, ours.channel, ours.spatial, primitives=ref_gating, gate=torch.sigmoid)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert_close(y2, y1, name="out")
    for i, (a, b) in enumerate(zip(_grads(ours, x2), _grads(timm_m, x1))):
        assert_close(a, b, name=f"grad {i}")
    assert_close(ours.spatial.conv.bn.running_mean, timm_m.spatial.conv.bn.running_mean, name="running_mean")


def test_max_ties_share_the_gradient_like_amax():
    """Ties at the max (ReLU zeros) split the gradient as torch.amax does."""
    torch.manual_seed(2)
    m = CbamModule(8).eval().double()
    ours = CBAM.from_timm(copy.deepcopy(m))
    x1 = torch.relu(torch.randn(2, 8, 4, 4, dtype=torch.float64)) * 0 - 1.0  # all equal
    x1[:, :, 0, 0] = -1.0
    x1 = x1.requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    m(x1).backward(g)
    cbam_op.cbam(x2, ours.channel, ours.spatial, primitives=ref_gating, gate=torch.sigmoid)[0].backward(g)
    assert_close(x2.grad, x1.grad, name="dx with ties")
