"""The SE reference equals timm's SEModule and torchvision's SqueezeExcitation."""
import copy

import pytest
import torch
from timm.layers.squeeze_excite import SEModule
from torchvision.ops.misc import SqueezeExcitation

from attnkern.nn import SqueezeExcite
from attnkern.reference import se as ref
from tests.tolerance import assert_close

MODULES = {
    "timm": lambda: SEModule(72),
    "timm-maxpool-bn-hardsigmoid": lambda: SEModule(72, add_maxpool=True, norm_layer=torch.nn.BatchNorm2d,
                                                   gate_layer="hard_sigmoid"),
    "torchvision-silu": lambda: SqueezeExcitation(72, 18, activation=torch.nn.SiLU),
    "torchvision-hardsigmoid": lambda: SqueezeExcitation(72, 24, scale_activation=torch.nn.Hardsigmoid),
}


def _convert(m):
    if isinstance(m, SEModule):
        return SqueezeExcite.from_timm(copy.deepcopy(m))
    return SqueezeExcite.from_torchvision(copy.deepcopy(m))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODULES))
def test_reference_equals_real_modules(name, train):
    torch.manual_seed(0)
    m = MODULES[name]().train(train).double()
    ours = _convert(m)
    x1 = torch.randn(3, 72, 5, 7, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1 = m(x1)
    y2, gc = ref.squeeze_excite(x2, ours.mlp, gate=ours._gate(), add_maxpool=ours.add_maxpool)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert gc.shape == (3, 72)
    assert_close(y2, y1, name="out")
    assert_close(x2.grad, x1.grad, name="dx")
    for (n, p), q in zip(ours.named_parameters(), m.parameters()):
        assert_close(p.grad, q.grad, name=n)
