"""attnkern.BAM: the authors' checkpoints load and compute their numbers; the maps and batch
sizes their code cannot take work; errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnkern
from attnkern.nn import BAM, bam_state_dict_from_authors
from attnkern.nn._layers import pointwise_conv
from tests.tolerance import assert_close


class AuthorsBAM(nn.Module):
    """The structure and key names of the BAM authors' released module (their ChannelGate and
    SpatialGate as Sequentials, combine by product, average pool over a square map)."""

    def __init__(self, C, r=16, num_dilated=2, dilation=4):
        super().__init__()
        rd = C // r
        self.channel_att = nn.Module()
        self.channel_att.gate_c = nn.Sequential()
        self.channel_att.gate_c.add_module("flatten", nn.Flatten())
        self.channel_att.gate_c.add_module("gate_c_fc_0", nn.Linear(C, rd))
        self.channel_att.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(rd))
        self.channel_att.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.channel_att.gate_c.add_module("gate_c_fc_final", nn.Linear(rd, C))
        self.spatial_att = nn.Module()
        s = self.spatial_att.gate_s = nn.Sequential()
        s.add_module("gate_s_conv_reduce0", nn.Conv2d(C, rd, 1))
        s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(rd))
        s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(num_dilated):
            s.add_module(f"gate_s_conv_di_{i}", nn.Conv2d(rd, rd, 3, padding=dilation, dilation=dilation))
            s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(rd))
            s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        s.add_module("gate_s_conv_final", nn.Conv2d(rd, 1, 1))

    def forward(self, x):
        pooled = F.avg_pool2d(x, x.size(2), stride=x.size(2))
        mc = self.channel_att.gate_c(pooled).unsqueeze(2).unsqueeze(3).expand_as(x)
        ms = self.spatial_att.gate_s(x).expand_as(x)
        return (1 + torch.sigmoid(mc * ms)) * x


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_authors_checkpoint_gives_their_numbers(train):
    torch.manual_seed(0)
    theirs = AuthorsBAM(64).train(train).double()
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    ours = BAM(64, combine="product").train(train).double()
    ours.load_state_dict(bam_state_dict_from_authors(theirs.state_dict()), strict=True)
    x1 = torch.randn(2, 64, 12, 12, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = theirs(x1), ours(x2)
    assert_close(y2, y1, name="out")
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert_close(x2.grad, x1.grad, name="dx")
    mapped = bam_state_dict_from_authors({n: p for n, p in theirs.named_parameters()})
    for n, p in ours.named_parameters():
        assert_close(p.grad, dict(theirs.named_parameters())[_inverse(n, mapped, theirs)].grad, name=n)


def _inverse(name, mapped, theirs):
    keys = list(dict(theirs.named_parameters()))
    return keys[list(mapped).index(name)]


def test_prefixed_keys_map():
    sd = {"layer2.bam.spatial_att.gate_s.gate_s_conv_di_1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}
    assert list(bam_state_dict_from_authors(sd)) == ["layer2.bam.spatial.conv_di.1.weight", "fc.weight"]


def test_non_square_and_batch_one_in_eval():
    m = BAM(32).eval()
    assert m(torch.randn(1, 32, 7, 13)).shape == (1, 32, 7, 13)
    assert m(torch.randn(3, 32, 1, 1)).shape == (3, 32, 1, 1)


def test_batch_one_in_train_gives_batchnorm_error():
    m = BAM(32).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 32, 8, 8))


def test_bad_input_errors():
    m = BAM(32)
    with pytest.raises(ValueError, match="x has 16 channels but the module was built for 32"):
        m(torch.randn(2, 16, 7, 7))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 32, 7))
    with pytest.raises(ValueError, match="combine must be one of"):
        BAM(32, combine="mean")


# ---------------------------------------------------------------------------------------------
# the spatial branch's 1x1 convolutions as batched matrix products (nn._layers.pointwise_conv)
# ---------------------------------------------------------------------------------------------

def _first_op(y):
    """The autograd node that made ``y`` (under the view the helper returns)."""
    fn = y.grad_fn
    if type(fn).__name__.startswith("View"):
        fn = fn.next_functions[0][0]
    return type(fn).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("shape,out_ch,bias", [((2, 24, 7, 5), 3, True), ((1, 33, 6, 9), 2, True),
                                                ((3, 16, 5, 5), 1, False)], ids=["odd", "batch1", "nobias"])
def test_pointwise_conv_is_the_convolution(shape, out_ch, bias, dtype):
    """On an NCHW CPU tensor the 1x1 convolution runs as a batched matrix product, and its
    output and the gradients of x, the weight and the bias are the convolution's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], out_ch, 1, bias=bias)
    x = torch.randn(shape)
    gy = torch.randn(shape[0], out_ch, *shape[2:])

    def run(c, xx, fn):
        xx = xx.detach().requires_grad_()
        y = fn(c, xx)
        y.backward(gy.to(y.dtype))
        grads = [xx.grad, c.weight.grad] + ([c.bias.grad] if bias else [])
        return y, grads, _first_op(y)

    low = copy.deepcopy(conv).to(dtype)
    y, grads, op = run(low, x.to(dtype), pointwise_conv)
    assert op in ("BaddbmmBackward0", "BmmBackward0"), op
    hi = torch.float64
    y64, grads64, _ = run(copy.deepcopy(conv).to(hi), x.to(hi), lambda c, t: c(t))
    if dtype in (torch.float32, torch.float64):
        assert_close(y, y64, dtype=dtype, name="out")
        for g, r, n in zip(grads, grads64, ("x", "weight", "bias")):
            assert_close(g, r, dtype=dtype, grad=True, name=f"grad {n}")
    else:
        ylow, gradslow, _ = run(copy.deepcopy(conv).to(dtype), x.to(dtype), lambda c, t: c(t))
        assert_close(y, y64, ylow, dtype=dtype, name="out")
        for g, r, rl, n in zip(grads, grads64, gradslow, ("x", "weight", "bias")):
            assert_close(g, r, rl, dtype=dtype, grad=True, name=f"grad {n}")
    assert y.dtype == dtype and y.is_contiguous()


def test_pointwise_conv_gradcheck():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 3, 1).double()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert _first_op(pointwise_conv(conv, x)) == "BaddbmmBackward0"
    assert torch.autograd.gradcheck(
        lambda xx, w, b: pointwise_conv(_with(conv, w, b), xx), (x, conv.weight, conv.bias))


def _with(conv, w, b):
    c = copy.copy(conv)
    c._parameters = dict(conv._parameters, weight=w, bias=b)
    return c


@pytest.mark.parametrize("case", ["channels_last", "hook", "3x3", "stride2", "instance_forward"])
def test_pointwise_conv_falls_back_to_the_module(case):
    """Where the product does not apply (or would skip a hook) the module itself runs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 2, 3 if case == "3x3" else 1, stride=2 if case == "stride2" else 1)
    x = torch.randn(2, 8, 6, 7)
    calls = []
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "hook":
        conv.register_forward_hook(lambda m, i, o: calls.append(1))
    elif case == "instance_forward":
        conv.forward = lambda t: calls.append(1) or nn.Conv2d.forward(conv, t)
    x.requires_grad_()
    y = pointwise_conv(conv, x)
    assert _first_op(y) == "ConvolutionBackward0"
    assert torch.equal(y, F.conv2d(x, conv.weight, conv.bias, conv.stride))
    assert calls == ([1] if case in ("hook", "instance_forward") else [])


def test_bam_spatial_branch_from_reduced_is_its_forward():
    """``BAM`` computes the spatial branch's first convolution itself and the rest with
    ``from_reduced`` (its last 1x1 convolution as a product in NCHW); the module's forward, with
    the convolutions, agrees in both layouts."""
    torch.manual_seed(0)
    m = BAM(32).eval()
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            h = m.spatial.conv_reduce(xx)
            assert_close(m.spatial.from_reduced(h), m.spatial(xx).double(), dtype=torch.float32, name="logits")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bam_spatial_projection_gradcheck(layout):
    """``attnkern.bam`` with ``spatial_projection`` (the projection computed by the block, its
    input gradient added into dx in place): gradients of x, the weight and the bias in float64."""
    torch.manual_seed(3)
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(3, 6, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mlp = nn.Linear(6, 6).double()
    v = torch.randn(3, dtype=torch.float64)

    def spatial(h):
        return (torch.tanh(h) * v.view(1, 3, 1, 1)).sum(1, keepdim=True)

    def f(x, w, b):
        return attnkern.bam(x, mlp, spatial, spatial_projection=(w, b))[0]

    def f_ref(x, w, b):
        return attnkern.bam(x, mlp, lambda t: spatial(F.conv2d(t, w, b)))[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)
    g = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    ours = torch.autograd.grad(f(x, w, b), (x, w, b), g)
    theirs = torch.autograd.grad(f_ref(x, w, b), (x, w, b), g)
    for a, r, n in zip(ours, theirs, ("x", "weight", "bias")):
        assert_close(a, r, name=f"grad {n}")
    # only the projection's parameters need a gradient (x does not)
    gw, gb = torch.autograd.grad(f(x.detach(), w, b), (w, b), g)
    rw, rb = torch.autograd.grad(f_ref(x.detach(), w, b), (w, b), g)
    assert_close(gw, rw, name="grad weight, x without grad")
    assert_close(gb, rb, name="grad bias, x without grad")


@pytest.mark.parametrize("bad,match", [
    (lambda w, b: (w[:, :3], b), r"weight must be \[R, 6, 1, 1\]"),
    (lambda w, b: (w, b[:2]), r"bias must be \[3\] or None"),
    (lambda w, b: (w.double(), b), "x's dtype and device"),
    (lambda w, b: w, r"a \(weight, bias\) pair"),
])
def test_bam_spatial_projection_errors(bad, match):
    x = torch.randn(2, 6, 4, 3)
    w, b = torch.randn(3, 6, 1, 1), torch.randn(3)
    with pytest.raises((ValueError, TypeError), match=match):
        attnkern.bam(x, nn.Linear(6, 6), lambda h: h[:, :1], spatial_projection=bad(w, b))


def test_bam_hooks_on_the_spatial_branch_still_run():
    """A hook on the spatial branch (or its first convolution) sees it called as a module."""
    torch.manual_seed(0)
    m = BAM(32).train()
    x = torch.randn(2, 32, 6, 5)
    seen = []
    m.spatial.register_forward_hook(lambda mod, i, o: seen.append("spatial"))
    m.spatial.conv_reduce.register_forward_hook(lambda mod, i, o: seen.append("conv_reduce"))
    m(x).sum().backward()
    assert seen == ["conv_reduce", "spatial"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [64, 128, 256])
def test_bam_narrow_branch_runs_the_direct_dilated_convolutions(train, layout, channels, monkeypatch):
    """On CPU a branch at most DIRECT_CONV_MAX_WIDTH wide runs its dilated convolutions as
    attnkern::dilated_conv, in training and in eval: the same output and gradients as with
    nn.Conv2d, and only for such branches; a hook on one convolution keeps that one's module
    call."""
    from attnkern.nn import bam as bam_module

    torch.manual_seed(0)
    m = BAM(channels).train(train)
    x = torch.randn(3, channels, 9, 11)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)

    # biases that feed a training-mode BatchNorm: their true gradient is 0, the computed one
    # rounding noise that two summation orders give differently
    noise_only = ("channel.fc1.bias", "conv_reduce.bias", "conv_di.0.bias", "conv_di.1.bias") if train else ()

    def step(model):
        xi = x.clone().requires_grad_()
        with torch.autograd.profiler.profile() as prof:
            out = model(xi)
            out.backward(g)
        direct = sum(e.name == "attnkern::dilated_conv" for e in prof.function_events)
        return out, [xi.grad] + [p.grad for n, p in model.named_parameters() if not n.endswith(noise_only)], direct

    ref = copy.deepcopy(m)
    out, grads, direct = step(m)
    assert direct == (2 if channels // 16 <= bam_module.DIRECT_CONV_MAX_WIDTH else 0)
    monkeypatch.setattr(bam_module, "DIRECT_CONV_MAX_WIDTH", 0)
    ref_out, ref_grads, ref_direct = step(ref)
    assert ref_direct == 0
    assert_close(out, ref_out.double(), name="out")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_close(a, b.double(), name=f"grad {i}", scale=b.abs().max().item())
    monkeypatch.undo()
    seen = []
    m.spatial.conv_di[0].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    for p in m.parameters():
        p.grad = None
    _, _, direct = step(m)
    assert seen == [torch.Size([3, channels // 16, 9, 11])]
    assert direct == (1 if channels // 16 <= bam_module.DIRECT_CONV_MAX_WIDTH else 0)
