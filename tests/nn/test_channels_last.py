"""channels_last through a converted model: every attnkern block takes and returns channels_last
tensors, forward and backward (the gradient each block hands back for its input, and the
model input's gradient), with the numbers of the NCHW timm model."""
import copy

import pytest
import timm
import torch

import attnkern
from attnkern.nn import BAM, CBAM, SqueezeExcite
from tests.tolerance import assert_close

CL = torch.channels_last
OURS = (CBAM, SqueezeExcite, BAM)


def _watch(model):
    """Forward hooks on every attnkern block recording whether its input, its output and (in
    backward) its input's gradient are channels_last."""
    seen = {"in": [], "out": [], "dx": []}

    def hook(mod, inp, out):
        x = inp[0]
        seen["in"].append(x.is_contiguous(memory_format=CL))
        seen["out"].append(out.is_contiguous(memory_format=CL))
        if x.requires_grad:
            x.register_hook(lambda g: seen["dx"].append(g.is_contiguous(memory_format=CL)))

    n = 0
    for m in model.modules():
        if isinstance(m, OURS):
            m.register_forward_hook(hook)
            n += 1
    return seen, n


@pytest.mark.parametrize("attn", ["cbam", "se"])
def test_converted_model_stays_channels_last(attn):
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False,
                            block_args=dict(attn_layer=attn)).train()
    ours = attnkern.convert(copy.deepcopy(ref)).to(memory_format=CL)
    seen, n = _watch(ours)
    assert n == 8

    x = torch.randn(2, 3, 64, 64)
    xs = x.contiguous(memory_format=CL).requires_grad_(True)
    y = ours(xs)
    w = torch.linspace(-1, 1, y.numel()).view(y.shape)
    (y * w).sum().backward()
    assert seen["in"] == [True] * n, "a block got an NCHW input: the test is not testing channels_last"
    assert seen["out"] == [True] * n, f"block outputs channels_last: {seen['out']}"
    assert seen["dx"] == [True] * n, f"block input gradients channels_last: {seen['dx']}"
    assert xs.grad.is_contiguous(memory_format=CL)

    # same numbers as the NCHW timm model: float32 against float64, within 2x the error of timm
    # itself in float32 (in NCHW)
    def run(model, inp):
        inp = inp.detach().clone().requires_grad_(True)
        out = model(inp)
        (out * w.to(out.dtype)).sum().backward()
        return out, inp.grad

    y64, dx64 = run(copy.deepcopy(ref).double(), x.double())
    y32, dx32 = run(copy.deepcopy(ref), x)
    # float64 training-mode BatchNorm over 2x2 maps amplifies rounding; the float32 timm model
    # shows the size of that noise and the rule allows 2x (3x for gradients) of it
    assert_close(y, y64, y32, dtype=torch.float32, name="logits")
    assert_close(xs.grad, dx64, dx32, dtype=torch.float32, grad=True, name="grad x")


@pytest.mark.parametrize("block", ["cbam", "se", "bam"])
def test_block_channels_last_non_square(block):
    """A single block on a channels_last non-square map (and a map with W == 1, where a
    tensor is both NCHW- and channels_last-contiguous only if C == 1): output and dx keep x's
    layout and equal the NCHW results."""
    torch.manual_seed(0)
    m = {"cbam": lambda: CBAM(32), "se": lambda: SqueezeExcite(32), "bam": lambda: BAM(32)}[block]().train()
    for shape in [(2, 32, 7, 13), (2, 32, 5, 1)]:
        x = torch.randn(*shape)
        outs = []
        for fmt in (torch.contiguous_format, CL):
            xi = x.clone(memory_format=fmt).requires_grad_(True)
            y = m(xi)
            y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape).contiguous(memory_format=fmt))
            assert y.is_contiguous(memory_format=fmt) and xi.grad.is_contiguous(memory_format=fmt), (shape, fmt)
            outs.append((y.detach(), xi.grad))
        assert_close(outs[1][0], outs[0][0], name=f"{shape} output")
        assert_close(outs[1][1], outs[0][1], grad=True, name=f"{shape} grad x")
