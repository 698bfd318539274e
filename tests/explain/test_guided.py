"""Guided Backpropagation and Guided Grad-CAM: the rule against a float64 hand computation,
against the grad-cam package's own GuidedBackpropReLUModel image by image, and the caller's
model left untouched."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from attnkern.explain.guided import guided_backprop, guided_gradcam, to_image


def test_rule_against_the_definition_float64():
    """x -> W1 -> ReLU -> W2 -> ReLU -> W3: the guided gradient is computed by hand,
    g <- g * (z > 0) * (g > 0) at each ReLU."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    r = guided_backprop(net, x, target=torch.tensor([0, 1, 2, 1]))
    W1, W2, W3 = net[0].weight, net[2].weight, net[4].weight
    z1 = x @ W1.T + net[0].bias
    z2 = z1.clamp_min(0) @ W2.T + net[2].bias
    g = W3[[0, 1, 2, 1]]                                  # d score / d relu2 output
    g = g * (z2 > 0) * (g > 0)
    g = g @ W2
    g = g * (z1 > 0) * (g > 0)
    expect = g @ W1
    torch.testing.assert_close(r.guided, expect.detach(), rtol=1e-12, atol=1e-12)
    # the ordinary gradient differs (the rule matters in this example)
    xg = x.clone().requires_grad_(True)
    plain = torch.autograd.grad(net(xg).gather(1, torch.tensor([[0], [1], [2], [1]])).sum(), xg)[0]
    assert (plain - expect).abs().max() > 1e-3


@pytest.fixture(scope="module")
def resnet():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=3).double().eval()


def test_batch_equals_the_package_image_by_image(resnet):
    from pytorch_grad_cam import GuidedBackpropReLUModel

    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = copy.deepcopy(resnet.state_dict())
    r = guided_backprop(resnet, x, target=torch.tensor([2, 0]))
    for b, c in enumerate([2, 0]):
        pkg = GuidedBackpropReLUModel(copy.deepcopy(resnet), device="cpu")(x[b:b + 1].clone(), target_category=c)
        np.testing.assert_allclose(r.guided[b].permute(1, 2, 0).numpy(), pkg, rtol=1e-10, atol=1e-12)
    # the caller's model is untouched: same weights, inplace ReLUs, no .grad
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in before.items())
    assert resnet.act1.inplace and type(resnet.act1) is nn.ReLU
    assert all(p.grad is None for p in resnet.parameters())


def test_guided_gradcam_is_the_product(resnet):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    r = guided_gradcam(resnet, x)
    assert torch.equal(r.target, r.logits.argmax(1))
    m = copy.deepcopy(resnet)
    with GradCAM(model=m, target_layers=[m.layer4]) as gc:
        g = gc(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in r.target])
    np.testing.assert_allclose(r.gradcam.numpy(), g, rtol=0, atol=1e-6)
    assert r.gradcam.shape == (2, 64, 64) and float(r.gradcam.min()) >= 0 and float(r.gradcam.max()) <= 1
    torch.testing.assert_close(r.guided_gradcam, r.guided * r.gradcam[:, None].double())
    img = to_image(r.guided_gradcam[0])
    assert img.shape == (64, 64, 3) and img.dtype == torch.uint8


def test_refuses_other_activations_and_bad_layers():
    import timm

    silu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"defined for ReLU networks; Sequential has other activations: 1 \(SiLU\)"):
        guided_backprop(silu, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="other activations"):
        guided_gradcam(timm.create_model("efficientnet_b0", num_classes=2).eval(), torch.randn(1, 3, 32, 32))
    nolu = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="no nn.ReLU module"):
        guided_backprop(nolu, torch.randn(1, 3, 2, 2))
    relu_mlp_head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="give layer="):
        guided_gradcam(relu_mlp_head, torch.randn(1, 3, 8, 8))
    r = guided_gradcam(relu_mlp_head, torch.randn(1, 3, 8, 8), layer="1")
    assert r.gradcam.shape == (1, 8, 8)
    with pytest.raises(IndexError, match="out of range for 2 classes"):
        guided_backprop(relu_mlp_head, torch.randn(1, 3, 8, 8), target=2)
