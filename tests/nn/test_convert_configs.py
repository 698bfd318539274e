"""convert() keeps every constructor argument of the layers it takes over: for each converter
(timm CbamModule and SEModule, torchvision SqueezeExcitation, the Linear-based SE layer) and
non-default configurations (activation slopes, gates, norms, biases, pooling), the converted
module computes what the original does, forward and backward, in float64. Configurations the
fused kernels cannot reproduce are refused and left unconverted, with a warning."""
import copy
import functools

import pytest
import torch
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

import attnkern
from attnkern.nn import CBAM, NotConvertible, SqueezeExcite

from tests.tolerance import assert_close

leaky = functools.partial(nn.LeakyReLU, negative_slope=0.3)


class LinearSE(nn.Module):
    """The common Linear-based SE layer (as in many CLAM-style and tutorial codebases)."""

    def __init__(self, c, r, act, gate):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, r, bias=False), act, nn.Linear(r, c, bias=False), gate)

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


def _two_gates(m):
    m.spatial.gate = nn.Hardsigmoid()  # channel and spatial gates differ
    return m


CASES = {
    "cbam-leaky0.3": (lambda: CbamModule(32, act_layer=leaky), CBAM),
    "cbam-silu-hardsigmoid-bias-k3": (lambda: CbamModule(24, rd_ratio=0.25, spatial_kernel_size=3, act_layer=nn.SiLU,
                                                         gate_layer="hard_sigmoid", mlp_bias=True), CBAM),
    "cbam-two-gates": (lambda: _two_gates(CbamModule(20, act_layer=nn.SiLU)), CBAM),
    "cbam-elu-alpha": (lambda: CbamModule(16, act_layer=functools.partial(nn.ELU, alpha=0.5)), CBAM),
    "se-leaky0.3-maxpool": (lambda: SEModule(32, act_layer=leaky, add_maxpool=True), SqueezeExcite),
    "se-bn-eps-hardsigmoid-nobias": (lambda: SEModule(24, norm_layer=functools.partial(nn.BatchNorm2d, eps=0.1, momentum=0.3),
                                                      gate_layer="hard_sigmoid", bias=False), SqueezeExcite),
    "torchvision-leaky-hardsigmoid": (lambda: SqueezeExcitation(32, 8, activation=leaky,
                                                                scale_activation=nn.Hardsigmoid), SqueezeExcite),
    "linear-se-leaky-hardsigmoid": (lambda: LinearSE(32, 8, nn.LeakyReLU(0.3), nn.Hardsigmoid()), SqueezeExcite),
}


def _grads(m, x):
    x = x.clone().requires_grad_(True)
    y = m(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    (y * w).sum().backward()
    return y, x.grad, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_converted_module_computes_what_the_original_did(case, train):
    torch.manual_seed(0)
    make, cls = CASES[case]
    ref = make().double().train(train)
    for p in ref.parameters():  # non-trivial biases and norm affines
        nn.init.normal_(p, 0.0, 0.5)
    ours = attnkern.convert(copy.deepcopy(ref))
    assert isinstance(ours, cls), f"{case}: not converted"
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, ours.channels, 7, 5, dtype=torch.float64)
    y, dx, g = _grads(ours, x)
    y_ref, dx_ref, g_ref = _grads(ref, x)
    assert_close(y, y_ref, name=f"{case} output")
    assert_close(dx, dx_ref, name=f"{case} grad x")
    assert g.keys() == g_ref.keys()
    for n in g:
        assert_close(g[n], g_ref[n], name=f"{case} grad {n}")


def test_the_issue_case_leaky_slope_is_kept():
    torch.manual_seed(0)
    ref = CbamModule(32, act_layer=leaky)
    ours = attnkern.convert(copy.deepcopy(ref))
    assert ours.channel.act.negative_slope == 0.3
    x = torch.randn(2, 32, 9, 9) * 4
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def _refusals():
    se = SEModule(16)
    se.fc1 = nn.Conv2d(16, 8, 3, padding=1)         # not a matrix product on the pooled vector
    tv = SqueezeExcitation(16, 4)
    tv.avgpool = nn.AdaptiveMaxPool2d(1)           # not an average
    cbam_conv = CbamModule(16)
    cbam_conv.spatial.conv.conv = nn.Conv2d(2, 1, 7, padding=1, bias=False)  # shrinks the map
    return {"se-3x3-fc1": se, "torchvision-maxpool": tv, "cbam-valid-conv": cbam_conv}


@pytest.mark.parametrize("case", ["se-3x3-fc1", "torchvision-maxpool", "cbam-valid-conv"])
def test_unreproducible_configuration_is_left_unconverted_with_a_warning(case):
    m = _refusals()[case]
    model = nn.Sequential(nn.Identity(), m)
    with pytest.warns(UserWarning, match="left unconverted"):
        attnkern.convert(model)
    assert model[1] is m
    with pytest.raises(NotConvertible):
        converter = {"cbam": CBAM.from_timm, "se-": SqueezeExcite.from_timm,
                     "torchvision": SqueezeExcite.from_torchvision}
        next(f for k, f in converter.items() if case.startswith(k))(m)
