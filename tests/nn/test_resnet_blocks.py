"""convert() patches timm's ResNet blocks (attnkern/nn/resnet.py): in eval mode each BatchNorm
is folded into the convolution before it. The patched model against the unpatched one (timm's
model with only its attention blocks converted): logits, the input gradient and every
parameter gradient in float64 (folding reorders roundings only), logits and input gradient in
float32 against the unpatched float64 model, NCHW and
channels_last, batch 1 and 3, non-square maps, both backends; state_dict keys unchanged;
training mode runs timm's forward; without autograd the attention's apply pass takes the residual
add and the ReLU (attnkern::gate_apply_residual_) unless hooks need the block called; unknown
block classes are left alone."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.resnet import BasicBlock, Bottleneck  # noqa: E402

import attnkern  # noqa: E402
from attnkern.nn.resnet import FOLDED_BLOCKS, conv_bn, folded_weights  # noqa: E402
from tests.backends import forced_backend_fixture  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

backend = forced_backend_fixture("cpu", "triton")

MODELS = {
    "cbam_resnet18": dict(model_name="resnet18", block_args=dict(attn_layer="cbam")),  # BasicBlock
    "seresnet26": dict(model_name="resnet26", block_args=dict(attn_layer="se")),         # Bottleneck
}
INPUTS = [(1, 3, 40, 36), (3, 3, 33, 47)]


def _model(name, dtype):
    torch.manual_seed(0)
    kw = dict(MODELS[name])
    m = timm.create_model(kw.pop("model_name"), pretrained=False, num_classes=7, zero_init_last=False, **kw)
    with torch.no_grad():  # running statistics and affines that are not the identity
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.to(dtype).eval()


def _grads(model, x):
    x = x.clone().requires_grad_()
    logits = model(x)
    w = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view(logits.shape)
    (logits * w).sum().backward()
    return logits.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", INPUTS, ids=["x".join(map(str, s)) for s in INPUTS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_computes_what_the_unpatched_one_does(name, dtype, shape, layout, backend):
    if backend == "triton" and (dtype == torch.float64 or shape[0] > 1):
        pytest.skip("the Triton kernels run under the interpreter: one case per model and layout")
    base = _model(name, dtype)
    unpatched = attnkern.convert(copy.deepcopy(base), patch_blocks=False)
    patched = attnkern.convert(copy.deepcopy(base))
    blocks = [m for m in patched.modules() if type(m) in FOLDED_BLOCKS.values()]
    assert blocks, "no block was patched"
    assert list(patched.state_dict()) == list(base.state_dict())
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        unpatched = unpatched.to(memory_format=torch.channels_last)
        patched = patched.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:  # the reference: the unpatched model in float64
        unpatched, x_ref = unpatched.double(), x.double()
    else:
        x_ref = x
    with torch.no_grad(), torch.autograd.profiler.profile() as prof:
        out = patched(x)
    with torch.no_grad():
        ref = unpatched(x_ref)
    if backend == "cpu":  # without autograd the attention's apply pass took the add and the ReLU
        calls = [e.name for e in prof.function_events]
        assert calls.count("attnkern::gate_apply_residual_") == len(blocks), calls.count("attnkern::gate_apply_residual_")
        assert "attnkern::gate_apply" not in calls
    assert out.dtype == dtype
    assert_close(out, ref, name="logits (no_grad)")
    y, dx, g = _grads(patched, x)
    y_ref, dx_ref, g_ref = _grads(unpatched, x_ref)
    assert_close(y, y_ref, name="logits")
    assert_close(dx, dx_ref, grad=True, name="grad x")
    if dtype == torch.float64:  # every parameter gradient (in float32 many are cancelling sums)
        scale = max(t.abs().max().item() for t in g_ref.values())
        for n in g_ref:
            assert_close(g[n], g_ref[n], grad=True, name=f"grad {n}", scale=scale)


def test_hooks_on_the_attention_block_still_fire():
    """A forward hook on the attention block (as Grad-CAM or feature extractors use) sees the
    block called: the fused residual pass gives way to the unfused code."""
    base = _model("cbam_resnet18", torch.float32)
    patched = attnkern.convert(copy.deepcopy(base))
    seen = []
    patched.layer2[0].se.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = patched(x)
        ref = attnkern.convert(copy.deepcopy(base), patch_blocks=False)(x)
    assert seen == [torch.Size([1, 128, 4, 4])]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_training_mode_runs_timms_forward():
    base = _model("cbam_resnet18", torch.float64).train()
    patched = attnkern.convert(copy.deepcopy(base))
    unpatched = attnkern.convert(copy.deepcopy(base), patch_blocks=False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(patched(x), unpatched(x), rtol=0, atol=0)
    for a, b in zip(patched.buffers(), unpatched.buffers()):  # running statistics updated alike
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoints_load_both_ways_and_the_model_pickles():
    base = _model("seresnet26", torch.float32)
    patched = attnkern.convert(copy.deepcopy(base))
    plain = _model("seresnet26", torch.float32)
    for p in plain.parameters():
        nn.init.normal_(p)
    plain.load_state_dict(patched.state_dict(), strict=True)
    patched.load_state_dict(base.state_dict(), strict=True)
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), patched(x))
    assert pickle.loads(pickle.dumps(type(again)))


def test_folded_weights_follow_parameter_and_statistic_changes():
    torch.manual_seed(2)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False).double(), nn.BatchNorm2d(6).double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        for step in range(3):
            torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)))
            if step == 0:
                bn.running_var.mul_(3.0)       # a statistic changes in place
            else:
                conv.weight.add_(0.5)          # a parameter changes in place
        first = folded_weights(conv, bn)
        assert folded_weights(conv, bn)[0] is first[0]  # cached while nothing changes
    bn.train()
    torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)))  # training mode: not folded


def test_unknown_block_classes_are_left_alone():
    class MyBottleneck(Bottleneck):
        pass

    block = MyBottleneck(64, 16)
    model = nn.Sequential(block, BasicBlock(64, 64))
    attnkern.convert(model)
    assert type(model[0]) is MyBottleneck
    assert type(model[1]) in FOLDED_BLOCKS.values()
    odd = BasicBlock(64, 64)
    odd.bn1 = nn.GroupNorm(8, 64)  # not a BatchNorm: nothing to fold
    assert type(attnkern.convert(nn.Sequential(odd))[0]) is BasicBlock


def test_compiled_patched_model_has_no_graph_break():
    base = _model("cbam_resnet18", torch.float32)
    patched = attnkern.convert(copy.deepcopy(base))
    x = torch.randn(1, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), base(x), rtol=1e-4, atol=1e-4)
