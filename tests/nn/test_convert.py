"""convert() on a whole timm model: same logits and parameter gradients, train and eval."""
import copy

import pytest
import timm
import torch

import attnkern
from attnkern.nn import CBAM
from tests.tolerance import assert_close


def _cbam_resnet50():
    torch.manual_seed(0)
    return timm.create_model("resnet50", pretrained=False, num_classes=10,
                             block_args=dict(attn_layer="cbam"), zero_init_last=False)


# Gradients are compared in float64 only. Through a whole model, float32 rounding of two
# equivalent computations can move a pre-activation that sits within rounding of zero across a
# ReLU (seen in SE-ResNet-50 on an AVX2-only CPU: one element at 3e-7 flips, a stem gradient
# moves by ~5% of the largest), and training-mode BatchNorm over a batch of 2 at the last stage
# (2x2 maps) amplifies float32 rounding far beyond any fixed tolerance; either would hide a real
# bug as well as it would flag one. The op tests compare float32 gradients block by block.
@pytest.mark.parametrize("train,dtype", [(False, torch.float32), (False, torch.float64),
                                         (True, torch.float64)], ids=["eval-fp32", "eval-fp64", "train-fp64"])
def test_cbam_resnet50_same_logits_and_grads(train, dtype):
    from timm.layers.cbam import CbamModule

    ref = _cbam_resnet50().train(train).to(dtype)
    n_cbam = sum(isinstance(m, CbamModule) for m in ref.modules())
    model = attnkern.convert(copy.deepcopy(ref))
    assert sum(isinstance(m, CBAM) for m in model.modules()) == n_cbam == 16
    assert not any(isinstance(m, CbamModule) for m in model.modules())
    assert list(model.state_dict().keys()) == list(ref.state_dict().keys())

    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    y_ref = ref(x)
    y = model(x)
    assert_close(y, y_ref, name="logits")
    if dtype != torch.float64:
        return
    y_ref.square().mean().backward()
    y.square().mean().backward()
    for (n, p), (n2, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert n == n2
        # relative to the model's largest gradient: some are zero up to rounding (a bias
        # followed by a linear layer and a training-mode BatchNorm)
        scale = max(r.grad.abs().max() for r in ref.parameters())
        assert_close(p.grad / scale, q.grad / scale, name=f"grad {n}")
    if train:
        for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
            if b.is_floating_point():
                assert_close(b, c, name=n)


def test_channels_last_model_stays_channels_last():
    model = attnkern.convert(_cbam_resnet50().eval()).to(memory_format=torch.channels_last)
    seen = []
    for m in model.modules():
        if isinstance(m, CBAM):
            m.register_forward_hook(lambda mod, inp, out: seen.append(
                out.is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model(x)
    assert seen and all(seen)
