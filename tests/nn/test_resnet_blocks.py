"""convert() patches timm's ResNet blocks (attnkern/nn/resnet.py): in eval mode each BatchNorm
is folded into the convolution before it. The patched model against the unpatched one (timm's
model with only its attention blocks converted): logits, the input gradient and every
parameter gradient in float64 (folding reorders roundings only), logits and input gradient in
float32 against the unpatched float64 model, NCHW and
channels_last, batch 1 and 3, non-square maps, both backends; state_dict keys unchanged;
training mode runs timm's forward with the residual add and the ReLU in the attention's apply pass
(attnkern::gate_apply_residual, out of place, with autograd); without autograd the apply pass
writes them into the block's own intermediate (attnkern::gate_apply_residual_); both give way to
the unfused code where hooks need the block called; unknown
block classes are left alone. The patched ResNet runs its features channels_last on CPU in
float32 (eval and training), and in bfloat16 / float16 where oneDNN has native kernels for them,
returns them in the input's layout and computes what timm's model does; its stem's BatchNorm is
folded in eval mode; float64, reduced dtypes without oneDNN's kernels, gradient checkpointing
and hooks on a folded pair keep timm's code."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.resnet import BasicBlock, Bottleneck  # noqa: E402

import attnkern  # noqa: E402
from attnkern.nn import resnet  # noqa: E402
from attnkern.nn.resnet import CHANNELS_LAST_MODELS, FOLDED_BLOCKS, conv_bn, folded_weights  # noqa: E402
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


def _assert_param_grads_close(g, g_ref):
    """Every parameter gradient against the reference's, the floor scaled by the largest."""
    scale = max(t.abs().max().item() for t in g_ref.values())
    for n in g_ref:
        assert_close(g[n], g_ref[n], grad=True, name=f"grad {n}", scale=scale)


def _grads(model, x):
    x = x.clone().requires_grad_()
    logits = model(x)
    w = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view(logits.shape)
    (logits * w).sum().backward()
    return logits.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _patched_against_unpatched(base, x):
    """convert() of copies of ``base`` with its blocks patched and without; each one's logits,
    input gradient and parameter gradients for x (see _grads), and the names of the calls the
    patched run made."""
    patched = attnkern.convert(copy.deepcopy(base))
    unpatched = attnkern.convert(copy.deepcopy(base), patch_blocks=False)
    with torch.autograd.profiler.profile() as prof:
        got = _grads(patched, x)
    return patched, unpatched, got, _grads(unpatched, x), [e.name for e in prof.function_events]


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
        _assert_param_grads_close(g, g_ref)


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


@pytest.mark.parametrize("name", list(MODELS))
def test_training_mode_computes_timms_forward_with_the_tail_in_the_apply_pass(name, backend):
    """Training mode: timm's forward module by module, the attention's apply pass taking the
    residual add and the ReLU (attnkern::gate_apply_residual, out of place) and their
    gradients; in float64 timm's values up to rounding (the kernels may contract the multiply
    and the add into one FMA), and the same gradients (input, every parameter) and running
    statistics."""
    base = _model(name, torch.float64).train()
    x = torch.randn(2, 3, 32, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    patched, unpatched, (y, dx, g), (y_ref, dx_ref, g_ref), calls = _patched_against_unpatched(base, x)
    blocks = [m for m in patched.modules() if type(m) in FOLDED_BLOCKS.values()]
    if backend == "cpu":
        assert calls.count("attnkern::gate_apply_residual") == len(blocks), calls.count("attnkern::gate_apply_residual")
        assert "attnkern::gate_apply" not in calls
    assert_close(y, y_ref, name="logits (training)")
    assert_close(dx, dx_ref, grad=True, name="grad x")
    _assert_param_grads_close(g, g_ref)
    for a, b in zip(patched.buffers(), unpatched.buffers()):  # running statistics updated alike
        if a.is_floating_point():
            assert_close(a, b, name="running statistic")
        else:
            assert torch.equal(a, b)


def test_training_with_frozen_batchnorms_folds_them_and_keeps_timms_gradients():
    """A model training with its BatchNorms frozen (in eval mode, as fine-tuning often does):
    those are folded, the rest trains as timm's; logits and every gradient as timm's."""
    base = _model("seresnet26", torch.float64).train()
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 3, 32, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, _, (y, dx, g), (y_ref, dx_ref, g_ref), calls = _patched_against_unpatched(base, x)
    assert "aten::batch_norm" not in calls, "a frozen BatchNorm ran unfolded"
    assert_close(y, y_ref, name="logits (frozen BatchNorms)")
    assert_close(dx, dx_ref, grad=True, name="grad x")
    _assert_param_grads_close(g, g_ref)


def test_eval_mode_with_autograd_fuses_the_tail_and_keeps_timms_gradients():
    """Eval mode under a gradient (Grad-CAM, attributions): the same out-of-place fused tail."""
    base = _model("seresnet26", torch.float64)
    x = torch.randn(1, 3, 40, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, _, (y, dx, _), (y_ref, dx_ref, _), calls = _patched_against_unpatched(base, x)
    assert "attnkern::gate_apply_residual" in calls
    assert_close(y, y_ref, name="logits")
    assert_close(dx, dx_ref, grad=True, name="grad x")


def test_checkpoints_load_both_ways_and_the_model_pickles():
    base = _model("seresnet26", torch.float32)
    patched = attnkern.convert(copy.deepcopy(base))
    plain = _model("seresnet26", torch.float32)
    for p in plain.parameters():
        nn.init.normal_(p)
    plain.load_state_dict(patched.state_dict(), strict=True)
    patched.load_state_dict(base.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = patched(x)  # folded and packed weights cached: neither is saved nor copied
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(again(x), out)
        torch.testing.assert_close(copy.deepcopy(patched)(x), out)
    assert pickle.loads(pickle.dumps(type(again)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_folded_weights_follow_parameter_and_statistic_changes(dtype):
    """float32 also runs oneDNN's inference op with the packed folded weight, which must follow
    every change too, and the input's shape."""
    torch.manual_seed(2)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False).to(dtype), nn.BatchNorm2d(6).to(dtype).eval()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(2 + step % 2, 4, 5, 5, dtype=dtype)  # the input's shape changes too
            torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)), **tol)
            if step == 0:
                bn.running_var.mul_(3.0)       # a statistic changes in place
            else:
                conv.weight.add_(0.5)          # a parameter changes in place
        first = folded_weights(conv, bn)
        assert folded_weights(conv, bn)[0] is first[0]  # cached while nothing changes
    bn.train()
    torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)), **tol)  # training mode: not folded


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


class _OneDNNConvSpy:
    """Counts the folded convolutions attnkern.nn.resnet hands to oneDNN's inference op, by
    post-op ("relu" or "none")."""

    def __init__(self, monkeypatch):
        self.attrs = []
        real = resnet._onednn_conv

        def spy(conv, weight, bias, x, attr, dtype):
            self.attrs.append(attr)
            return real(conv, weight, bias, x, attr, dtype)
        monkeypatch.setattr(resnet, "_onednn_conv", spy)


def _inner_layouts(model, x):
    """Run ``model`` on x; return the output and, for the stem's convolution and each stage
    called through its module, whether its output was channels_last (and not also
    NCHW-contiguous)."""
    seen = []
    hooks = [mod.register_forward_hook(lambda m, i, o: seen.append(
                 o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()))
             for mod in (model.conv1, model.layer1, model.layer2, model.layer3, model.layer4)]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_resnet_runs_its_features_channels_last_and_returns_the_inputs_layout(name):
    base = _model(name, torch.float32)
    patched = attnkern.convert(copy.deepcopy(base))
    assert type(patched) in CHANNELS_LAST_MODELS.values()
    assert list(patched.state_dict()) == list(base.state_dict())
    x = torch.randn(2, 3, 41, 37, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, layouts = _inner_layouts(patched, x)
        assert layouts == [True] * 5  # every stage ran channels_last though x is NCHW
        feats = patched.forward_features(x)
        assert feats.is_contiguous()  # back in the input's layout
        ref_feats = base.double().forward_features(x.double())
        assert_close(feats, ref_feats, name="features (NCHW input)")
        assert_close(out, base(x.double()), name="logits (NCHW input)")
        x_cl = x.contiguous(memory_format=torch.channels_last)
        feats_cl = patched.forward_features(x_cl)
        assert feats_cl.is_contiguous(memory_format=torch.channels_last) and not feats_cl.is_contiguous()
        assert_close(feats_cl, ref_feats, name="features (channels_last input)")
        y = patched.forward_features(x[:, :, 1:, 2:])  # a non-contiguous view: NCHW-like
        assert y.is_contiguous()
        assert_close(y, base.forward_features(x[:, :, 1:, 2:].double()), name="features (view)")


def test_patched_resnet_trains_channels_last_with_timms_gradients():
    base = _model("cbam_resnet18", torch.float32).train()
    patched = attnkern.convert(copy.deepcopy(base)).train()
    ref = copy.deepcopy(base).double().train()
    x = torch.randn(3, 3, 36, 44, generator=torch.Generator().manual_seed(4))
    out, layouts = _inner_layouts(patched, x)
    assert layouts == [True] * 5
    w = torch.linspace(-1, 1, out.numel()).view(out.shape)
    (out * w).sum().backward()
    out_ref = ref(x.double())
    (out_ref * w.double()).sum().backward()
    assert_close(out, out_ref, name="logits (training)")
    grads = {n: p.grad for n, p in patched.named_parameters()}
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    scale = max(t.abs().max().item() for t in grads_ref.values())
    for n, g in grads_ref.items():
        assert_close(grads[n], g, grad=True, name=f"grad {n}", scale=scale)
    for a, b in zip(patched.buffers(), ref.buffers()):  # running statistics updated alike
        if a.is_floating_point():
            assert_close(a, b, name="running statistic")


def test_patched_resnet_keeps_timms_layout_where_it_does_not_apply():
    """float64 (oneDNN has no float64 convolutions) and gradient checkpointing run timm's code."""
    base = _model("cbam_resnet18", torch.float64)
    patched = attnkern.convert(copy.deepcopy(base))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out, layouts = _inner_layouts(patched, x)
    assert layouts == [False] * 5
    torch.testing.assert_close(out, base(x))
    patched32 = attnkern.convert(_model("cbam_resnet18", torch.float32)).train()
    patched32.set_grad_checkpointing(True)
    _, layouts = _inner_layouts(patched32, torch.randn(2, 3, 64, 64))
    assert layouts and not any(layouts)  # the stages run through checkpoint_seq


def test_stem_batchnorm_is_folded_in_eval_unless_hooked():
    base = _model("seresnet26", torch.float32)  # SE has no norm of its own: the stem's is the last
    patched = attnkern.convert(copy.deepcopy(base))
    x = torch.randn(1, 3, 32, 32)

    def norms_run():
        with torch.no_grad(), torch.autograd.profiler.profile() as prof:
            out = patched(x)
        return out, sum(e.name == "aten::native_batch_norm" for e in prof.function_events)

    out, n = norms_run()
    assert n == 0
    with torch.no_grad():
        assert_close(out, base.double()(x.double()), name="logits")
    seen = []
    patched.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out, n = norms_run()
    assert n == 1 and seen == [torch.Size([1, 64, 16, 16])]  # a hooked BatchNorm is called


@pytest.mark.parametrize("name", list(MODELS))
def test_relus_after_folded_convolutions_are_onednn_post_ops_without_autograd(name, monkeypatch):
    """Stem and first convolutions of each block: one oneDNN convolution with a ReLU post-op
    under no_grad in float32; a hooked ReLU, a DropBlock between norm and ReLU, autograd or
    float64 keep the separate activation, with the same numbers."""
    base = _model(name, torch.float32)
    patched = attnkern.convert(copy.deepcopy(base))
    blocks = [m for m in patched.modules() if type(m) in FOLDED_BLOCKS.values()]
    per_block = 2 if name == "seresnet26" else 1  # Bottleneck: conv1 and conv2; BasicBlock: conv1
    x = torch.randn(2, 3, 35, 41, generator=torch.Generator().manual_seed(5))
    ref = copy.deepcopy(base).double()(x.double()).detach()

    spy = _OneDNNConvSpy(monkeypatch)
    convs = 1 + sum(3 if name == "seresnet26" else 2 for _ in blocks) + sum(b.downsample is not None for b in blocks)

    def post_ops():
        spy.attrs.clear()
        with torch.no_grad(), torch.autograd.profiler.profile() as prof:
            out = patched(x)
        assert_close(out, ref, name="logits")
        # every folded convolution ran as oneDNN's inference op, with or without the ReLU
        assert sum(e.name == "mkldnn::_convolution_pointwise" for e in prof.function_events) == len(spy.attrs)
        assert len(spy.attrs) == convs
        return spy.attrs.count("relu")

    assert post_ops() == 1 + per_block * len(blocks)
    seen = []
    blocks[0].act1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    blocks[1].drop_block = nn.Dropout(0.0)  # not an Identity: the norm's output goes through it first
    # one fewer in blocks[0] (conv1's hooked ReLU), one in blocks[1] (conv1 of a BasicBlock,
    # conv2 of a Bottleneck: where its DropBlock sits)
    assert post_ops() == 1 + per_block * len(blocks) - 2
    assert len(seen) == 1
    with torch.autograd.profiler.profile() as prof:  # autograd: no post-op (it has no derivative)
        y, dx, _ = _grads(patched, x)
    assert not any(e.name == "mkldnn::_convolution_pointwise" for e in prof.function_events)
    assert_close(y, ref, name="logits (autograd)")
    # CPU autocast to bfloat16: where oneDNN has bfloat16 kernels, the same ops in bfloat16 (the
    # cast autocast would make is made here); elsewhere autocast's own convolutions
    spy.attrs.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = patched(x)
        y_timm = copy.deepcopy(base)(x)
    native = resnet._onednn_reduced_supported(torch.bfloat16)
    assert spy.attrs.count("relu") == ((1 + per_block * len(blocks) - 2) if native else 0)
    assert y.dtype == y_timm.dtype == torch.bfloat16
    assert_close(y, ref.float(), y_timm, dtype=torch.bfloat16, name="logits (autocast)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_reduced_precision_model_runs_channels_last_where_onednn_has_its_kernels(dtype, monkeypatch):
    """A bfloat16 or float16 model on a CPU where oneDNN has native kernels for that dtype (as
    inductor checks it): features channels_last and ReLU post-ops, as in float32. Where it has
    none (forced here, so every CPU runs both branches): timm's layout and separate ReLUs. Both
    compute what timm's model computes in that dtype, against the same model in float32."""
    low = _model("seresnet26", torch.float32).to(dtype)
    patched = attnkern.convert(copy.deepcopy(low))
    blocks = [m for m in patched.modules() if type(m) in FOLDED_BLOCKS.values()]
    x32 = torch.randn(2, 3, 35, 41, generator=torch.Generator().manual_seed(6))
    x = x32.to(dtype)
    with torch.no_grad():
        ref_lowp = low(x)
        ref32 = copy.deepcopy(low).float()(x.float())

    spy = _OneDNNConvSpy(monkeypatch)

    def run():
        spy.attrs.clear()
        with torch.no_grad():
            out = patched(x)
            post_ops = spy.attrs.count("relu")
            _, layouts = _inner_layouts(patched, x)
        assert out.dtype == dtype
        assert_close(out, ref32, ref_lowp, name=f"logits ({dtype})")
        return layouts, post_ops

    native = resnet._onednn_reduced_supported(dtype)
    layouts, post_ops = run()
    assert layouts == [native] * 5
    assert post_ops == ((1 + 2 * len(blocks)) if native else 0)
    training = copy.deepcopy(patched).train()  # training mode: the same layout, timm's gradients
    xs = {k: x.to(t).clone().requires_grad_()
          for k, t in (("patched", dtype), (dtype, dtype), (torch.float32, torch.float32))}
    out, layouts = _inner_layouts(training, xs["patched"])
    assert layouts == [native] * 5
    train_lowp, train32 = copy.deepcopy(low).train()(xs[dtype]), copy.deepcopy(low).float().train()(xs[torch.float32])
    assert_close(out, train32, train_lowp, name=f"logits (training, {dtype})")
    w = torch.linspace(-1, 1, out.numel()).view(out.shape)
    for y in (out, train_lowp, train32):
        (y * w.to(y.dtype)).sum().backward()
    assert_close(xs["patched"].grad, xs[torch.float32].grad, xs[dtype].grad, grad=True, name=f"grad x ({dtype})")
    monkeypatch.setattr(resnet, "_onednn_reduced_supported", lambda dt: False)
    layouts, post_ops = run()
    assert layouts == [False] * 5 and post_ops == 0


def test_jit_trace_without_autograd_records_no_opaque_onednn_weight():
    """torch.jit.trace under no_grad: the folded convolutions are recorded as plain ones (a
    packed oneDNN weight cannot be a constant of a saved graph), and the traced model runs."""
    patched = attnkern.convert(_model("cbam_resnet18", torch.float32))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = patched(x)
        traced = torch.jit.trace(patched, x, check_trace=False)
        assert "mkldnn::_convolution_pointwise" not in str(traced.inlined_graph)
        assert_close(traced(x), ref.double(), name="traced logits")
