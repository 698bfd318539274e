"""attnkern.Attention against timm's ViT Attention: same arguments, state_dict keys, outputs
and gradients; convert() on whole timm ViTs; the q/k kept for attention maps."""
import copy
import functools

import pytest
import timm
import torch
from timm.layers.attention import Attention as TimmAttention
from torch import nn

import attnkern
from tests.tolerance import assert_close
from tests.backends import forced_backend_fixture

backend = forced_backend_fixture("cpu", "triton")


def _grads(m, x, g):
    x = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    out = m(x)
    out.backward(g)
    return out, [x.grad] + [p.grad for p in m.parameters()]


OPTIONS = [
    dict(),
    dict(qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm),
    dict(scale_norm=True, norm_layer=nn.LayerNorm, proj_bias=False),
    dict(gated=True, qkv_bias=True),
    dict(attn_head_dim=40, dim_out=24),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "qk_norm", "scale_norm", "gated", "head_dim40"])
def test_module_matches_timm(backend, opts):
    torch.manual_seed(0)
    theirs = TimmAttention(48, num_heads=3, **opts).eval()
    ours = attnkern.Attention(48, num_heads=3, **opts).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 17, 48)
    g = torch.randn(2, 17, opts.get("dim_out", 48))
    out, grads = _grads(ours, x, g)
    r_out, r_grads = _grads(copy.deepcopy(theirs).double(), x.double(), g.double())
    assert_close(out, r_out, name="out")
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    for name, a, r in zip(names, grads, r_grads):
        assert_close(a, r, grad=True, name=name)


def test_mask_and_causal_are_passed_through(backend):
    torch.manual_seed(1)
    theirs = TimmAttention(32, num_heads=2).eval()
    ours = attnkern.Attention.from_timm(copy.deepcopy(theirs))
    x = torch.randn(2, 9, 32)
    pad = (torch.arange(9)[None] < torch.tensor([9, 4])[:, None]).view(2, 1, 1, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, attn_mask=pad), theirs(x, attn_mask=pad), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x, is_causal=True), theirs(x, is_causal=True), rtol=1e-5, atol=1e-6)


def test_convert_vit_small_equal_logits_and_gradients():
    """The issue's check: timm vit_small_patch16_224 (random weights), converted, gives equal
    logits and parameter gradients (cpu backend: ATen's SDPA on both sides)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    conv = attnkern.convert(copy.deepcopy(model))
    assert sum(isinstance(m, attnkern.Attention) for m in conv.modules()) == 12
    assert not any(isinstance(m, TimmAttention) for m in conv.modules())
    x = torch.randn(1, 3, 224, 224)
    a = conv(x)
    b = model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.square().sum().backward()
    b.square().sum().backward()
    for (n, p), (_, q) in zip(conv.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    # the checkpoint round trip is strict both ways
    model.load_state_dict(conv.state_dict(), strict=True)
    conv.load_state_dict(model.state_dict(), strict=True)


def test_convert_small_vit_on_triton(monkeypatch):
    """A small ViT (17 tokens, head dim 32) converted and run on the Triton kernels: logits and
    gradients equal timm's in float64 reference math up to the float32 tolerance."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ATTNKERN_BACKEND", "triton")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                              num_classes=5).eval()
    conv = attnkern.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64)
    out, grads = _grads(conv, x, torch.ones(2, 5))
    r_out, r_grads = _grads(copy.deepcopy(model).double(), x.double(), torch.ones(2, 5, dtype=torch.float64))
    assert_close(out, r_out, name="logits")
    scale = max(float(g.abs().max()) for g in r_grads[1:])
    for (n, _), a, r in zip([("x", None)] + list(conv.named_parameters()), grads, r_grads):
        assert_close(a, r, grad=True, name=n, scale=scale)


def test_keep_qk_gives_the_cls_attention():
    torch.manual_seed(2)
    m = attnkern.Attention(32, num_heads=4).eval()
    x = torch.randn(1, 10, 32)
    m(x)
    assert m.last_qk is None
    m.keep_qk = True
    m(x)
    q, k = m.last_qk
    assert q.shape == k.shape == (1, 4, 10, 8) and not q.requires_grad
    with torch.no_grad():
        qkv = m.qkv(x).reshape(1, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
        p = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * m.scale, -1)
    from attnkern.reference.attention import attention_probs

    torch.testing.assert_close(attention_probs(q, k)[0][:, :, 0], p[:, :, 0])


def test_bad_input():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        attnkern.Attention(30, num_heads=4)
    with pytest.raises(ValueError, match="norm_layer"):
        attnkern.Attention(32, qk_norm=True)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        attnkern.Attention(32, num_heads=4)(torch.randn(2, 32))


def test_constructor_takes_timms_arguments():
    """attnkern.Attention takes exactly the arguments of the installed timm's Attention."""
    import inspect

    def params(cls):
        return [(p.name, p.default, p.kind) for p in inspect.signature(cls.__init__).parameters.values()]

    assert params(attnkern.Attention) == params(TimmAttention)


class _ScaledRms(nn.Module):
    """A norm layer with its own constructor arguments (eps, a fixed gain), as users pass."""

    def __init__(self, dim, eps=1e-6, gain=1.0, device=None, dtype=None):
        super().__init__()
        self.eps, self.gain = eps, gain
        self.weight = nn.Parameter(torch.randn(dim, device=device, dtype=dtype))

    def forward(self, x):
        return self.gain * self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


CONVERT_OPTIONS = [
    dict(qk_norm=True, norm_layer=functools.partial(_ScaledRms, eps=1e-2, gain=3.0)),
    dict(qk_norm=True, scale_norm=True, norm_layer=functools.partial(nn.LayerNorm, eps=0.3,
                                                                     elementwise_affine=False)),
    dict(proj_bias=False, qkv_bias=True, gated=True),
    dict(attn_head_dim=20, dim_out=12, qk_norm=True, norm_layer=functools.partial(nn.RMSNorm, eps=0.5)),
]


@pytest.mark.parametrize("opts", CONVERT_OPTIONS, ids=["custom-norm", "ln-eps", "no-proj-bias-gated", "rmsnorm-head-dim20"])
def test_convert_keeps_every_configuration(opts):
    """convert() takes over timm's layer objects, so non-default constructor arguments of the
    small layers (a norm layer's eps, a custom norm class) survive: the converted module
    computes what the original does (float64, output and every gradient)."""
    torch.manual_seed(5)
    theirs = TimmAttention(32, num_heads=4, **opts).double().eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = attnkern.convert(copy.deepcopy(theirs))
    assert isinstance(ours, attnkern.Attention)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    g = torch.randn(2, 9, opts.get("dim_out", 32), dtype=torch.float64)
    out, grads = _grads(ours, x, g)
    r_out, r_grads = _grads(theirs, x, g)
    torch.testing.assert_close(out, r_out, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, r_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


def test_convert_uses_timms_scale_on_its_explicit_path():
    torch.manual_seed(6)
    theirs = TimmAttention(16, num_heads=2).double().eval()
    theirs.fused_attn = False
    theirs.scale = 0.05  # the explicit path multiplies by m.scale; the fused one ignores it
    ours = attnkern.Attention.from_timm(copy.deepcopy(theirs))
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-12)


def test_convert_refuses_what_it_cannot_reproduce():
    """A timm Attention with a submodule the converter does not know, or a forward hook, is
    left unconverted with a warning that says why; from_timm raises."""
    extra = TimmAttention(16, num_heads=2)
    extra.rope = nn.Linear(8, 8)
    hooked = TimmAttention(16, num_heads=2)
    hooked.register_forward_hook(lambda mod, args, out: out * 2)
    for m, why in ((extra, "submodules this converter does not know"), (hooked, "forward hooks")):
        parent = nn.Sequential(m)
        with pytest.warns(UserWarning, match=why):
            attnkern.convert(parent)
        assert parent[0] is m
        with pytest.raises(ValueError, match="left unconverted"):
            attnkern.Attention.from_timm(m)
