"""attnkern.SqueezeExcite as a drop-in, and convert() on whole SE models."""
import copy

import pytest
import timm
import torch
import torchvision

import attnkern
from attnkern.nn import SqueezeExcite
from tests.tolerance import assert_close


class SELayer(torch.nn.Module):
    """The common Linear-based SE layer found in many code bases."""

    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Sequential(
            torch.nn.Linear(channel, channel // reduction, bias=False), torch.nn.ReLU(inplace=True),
            torch.nn.Linear(channel // reduction, channel, bias=False), torch.nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        return x * self.fc(y).view(b, c, 1, 1).expand_as(x)


def test_timm_defaults_and_rounding():
    import inspect

    from timm.layers.squeeze_excite import SEModule

    ours, theirs = inspect.signature(SqueezeExcite).parameters, inspect.signature(SEModule).parameters
    for name, p in theirs.items():
        if name not in ("device", "dtype"):
            assert ours[name].default == p.default, name
    for C in (24, 72, 100, 256, 2048):
        assert SqueezeExcite(C).fc1.out_channels == SEModule(C).fc1.out_channels
        assert list(SqueezeExcite(C).state_dict()) == list(SEModule(C).state_dict())


def test_linear_se_layer_converts_with_its_keys():
    torch.manual_seed(0)
    m = SELayer(64)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), m)
    ref = copy.deepcopy(model)
    attnkern.convert(model)
    assert isinstance(model[1], SqueezeExcite)
    assert list(model.state_dict()) == list(ref.state_dict()) == ["0.weight", "0.bias", "1.fc.0.weight", "1.fc.2.weight"]
    x = torch.randn(2, 3, 11, 9)
    assert_close(model(x), ref(x), name="out")


def test_bad_input_errors():
    m = SqueezeExcite(24)
    with pytest.raises(ValueError, match="x has 16 channels but the module was built for 24"):
        m(torch.randn(2, 16, 7, 7))
    with pytest.raises(TypeError, match="got torch.int32"):
        m(torch.ones(2, 24, 7, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must not be empty"):
        m(torch.randn(0, 24, 7, 7))
    with pytest.raises(ValueError, match="x is on meta"):
        m(torch.randn(2, 24, 7, 7, device="meta"))


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


MODELS = {
    "seresnet50": lambda: timm.create_model("seresnet50", pretrained=False, num_classes=10, zero_init_last=False),
    "resnet50-se": lambda: timm.create_model("resnet50", pretrained=False, num_classes=10,
                                             block_args=dict(attn_layer="se"), zero_init_last=False),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
}


@pytest.mark.parametrize("train,dtype", [(False, torch.float32), (False, torch.float64), (True, torch.float64)],
                         ids=["eval-fp32", "eval-fp64", "train-fp64"])
@pytest.mark.parametrize("name", list(MODELS))
def test_whole_models_same_logits_and_grads(name, train, dtype):
    """Gradients are compared in float64 only: through a whole model, float32 rounding of two
    equivalent computations moves a pre-activation that sits within rounding of zero across a
    ReLU (seresnet50, 64x64 input: one element of 65536 at 3e-7 flips on a CPU whose vector
    width changes the summation order), which changes a stem gradient by ~5% of the largest;
    and training-mode BatchNorm over a batch of 2 amplifies float32 rounding beyond any fixed
    tolerance. The op tests compare float32 gradients block by block."""
    torch.manual_seed(0)
    ref = MODELS[name]().train(train).to(dtype)
    n_before = len(list(ref.modules()))
    model = attnkern.convert(copy.deepcopy(ref))
    assert _count(model, SqueezeExcite) > 0
    assert len(list(model.modules())) <= n_before
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    torch.manual_seed(1)  # dropout / stochastic depth draw the same masks in both
    y_ref = ref(x)
    torch.manual_seed(1)
    y = model(x)
    assert_close(y, y_ref, name="logits")
    if dtype != torch.float64:
        return
    y_ref.square().mean().backward()
    y.square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        # relative to the model's largest gradient: some are zero up to rounding (a bias
        # followed by a linear layer and a training-mode BatchNorm)
        scale = max(r.grad.abs().max() for r in ref.parameters())
        assert_close(p.grad / scale, q.grad / scale, name=f"grad {n}")
