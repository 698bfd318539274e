"""Checkpoints: a converted model's state_dict loads into the unconverted model and the other way
round, with strict=True, through torch.save/torch.load, and the loaded model computes what the
model that saved it computes."""
import copy
import io

import pytest
import timm
import torch
import torchvision

import attnkern
from attnkern.nn import CBAM, SqueezeExcite
from tests.tolerance import assert_close


def _timm(attn):
    return lambda: timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False,
                                     block_args=dict(attn_layer=attn))


MODELS = {
    "cbam-resnet18": (_timm("cbam"), CBAM, 8),
    "se-resnet18": (_timm("se"), SqueezeExcite, 8),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), SqueezeExcite, 9),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), SqueezeExcite, 16),
}


_BUILT = {}


def _build(name, seed):
    """The model ``name`` with weights and BatchNorm statistics drawn from ``seed`` (so a
    parameter or buffer that failed to load would show), in eval mode."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = MODELS[name][0]()
    m = copy.deepcopy(_BUILT[name])  # a deep copy is much cheaper than building the model again
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.num_batches_tracked.fill_(seed + 3)
    return m.eval()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_round_trip(name):
    _, ours_cls, n_blocks = MODELS[name]
    x = torch.randn(2, 3, 32, 32)

    src = _build(name, 0)                              # the unconverted model
    conv = attnkern.convert(_build(name, 0))           # the converted model, same weights
    assert sum(isinstance(m, ours_cls) for m in conv.modules()) == n_blocks
    _same_state(conv, src)
    with torch.no_grad():
        y_src, y_conv = src(x), conv(x)
    assert_close(y_conv, y_src, name="converted vs unconverted")  # (tests/nn/test_convert.py: exact rule)

    # converted -> unconverted: a fresh timm/torchvision model with other weights
    plain = _build(name, 1)
    with torch.no_grad():
        assert not torch.allclose(plain(x), y_src)     # it differs before loading
    plain.load_state_dict(_roundtrip(conv.state_dict()), strict=True)
    _same_state(plain, src)
    with torch.no_grad():
        assert torch.equal(plain(x), y_src)

    # unconverted -> converted: a fresh converted model with other weights
    conv2 = attnkern.convert(_build(name, 2))
    with torch.no_grad():
        assert not torch.allclose(conv2(x), y_conv)
    conv2.load_state_dict(_roundtrip(src.state_dict()), strict=True)
    _same_state(conv2, conv)
    with torch.no_grad():
        assert torch.equal(conv2(x), y_conv)


def test_training_a_converted_model_gives_a_timm_checkpoint():
    """Train the converted model a few steps (BatchNorm statistics move too), save, load into
    timm: timm computes what the trained converted model computes."""
    torch.manual_seed(0)
    conv = attnkern.convert(_timm("cbam")()).train()
    opt = torch.optim.SGD(conv.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        x = torch.randn(4, 3, 32, 32)
        loss = torch.nn.functional.cross_entropy(conv(x), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    plain = _timm("cbam")()
    plain.load_state_dict(_roundtrip(conv.state_dict()), strict=True)
    _same_state(plain, conv)
    conv.eval(), plain.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y, y_plain = conv(x), plain(x)
        y64 = copy.deepcopy(plain).double()(x.double())
    assert_close(y, y64, y_plain, name="logits after training")
