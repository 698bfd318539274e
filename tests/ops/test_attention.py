"""attnkern.scaled_dot_product_attention on every backend against the reference and ATen:
forward and gradients (q, k, v and an additive mask), mask kinds and broadcasting, strided
views of a packed qkv projection, dtypes under the tolerance rule, the torch.library op
(opcheck, torch.compile fullgraph), determinism, dropout, fallbacks and argument errors.

The triton backend runs under Triton's interpreter on CPU tensors here (small shapes); the
kernels' own case matrix is tests/triton/test_attention.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern.reference import attention as ref
from tests.tolerance import assert_close

BACKENDS = ["cpu", "triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ATTNKERN_BACKEND", request.param)
    return request.param


def _qkv(B, H, Nq, Nk, D, dtype, Dv=None, seed=0, packed=False):
    g = torch.Generator().manual_seed(seed)
    if packed:  # views of one qkv projection, as a ViT cuts them: no copy, D stride 1, odd strides
        assert Nq == Nk and Dv is None
        qkv = torch.randn(B, Nq, 3 * H * D, generator=g).to(dtype)
        qkv = qkv.reshape(B, Nq, 3, H, D).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, H, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, H, Nk, Dv or D, generator=g).to(dtype)
    return q, k, v


def _mask(kind, B, H, Nq, Nk, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(Nq, Nk, generator=g) > 0.25
    if kind == "key_padding":  # bags of different sizes; the second bag has 3 valid keys
        lengths = torch.tensor([Nk, 3, 1][:B])
        return (torch.arange(Nk)[None, :] < lengths[:, None]).view(B, 1, 1, Nk)
    if kind == "additive":
        return torch.randn(B, 1, Nq, Nk, generator=g).to(dtype)
    if kind == "additive_f32":
        return torch.randn(H, 1, Nk, generator=g)
    raise ValueError(kind)


def _run(fn, q, k, v, mask, causal, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    m = mask
    if m is not None and m.is_floating_point():
        m = m.detach().clone().requires_grad_()
    out = fn(q, k, v, attn_mask=m, is_causal=causal)
    out.backward(dout)
    grads = [q.grad, k.grad, v.grad] + ([m.grad] if m is not None and m.is_floating_point() else [])
    return out, grads


def _check(q, k, v, mask, causal, dtype, seed=2):
    """Our op against the reference in the higher precision and in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=g).to(dtype)
    out, grads = _run(attnkern.scaled_dot_product_attention, q, k, v, mask, causal, dout)
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    up = lambda t: None if t is None else (t if t.dtype == torch.bool else t.to(hi))
    h_out, h_grads = _run(ref.scaled_dot_product_attention, up(q), up(k), up(v), up(mask), causal, up(dout))
    s_out, s_grads = (None, [None] * len(h_grads))
    if dtype != torch.float32:
        lowp = lambda *a, **kw: ref.scaled_dot_product_attention(*a, upcast=False, **kw)
        s_out, s_grads = _run(lowp, q, k, v, mask, causal, dout)
    assert out.dtype == dtype and out.shape == h_out.shape
    assert_close(out, h_out, s_out, dtype=dtype, name="out")
    for name, a, h, s in zip(["dq", "dk", "dv", "dmask"], grads, h_grads, s_grads):
        assert a is not None, name
        # the mask's gradient keeps the mask's dtype (float32 or q's dtype)
        assert_close(a, h, s, dtype=dtype if name != "dmask" or a.dtype == dtype else torch.float32,
                     grad=True, name=name, scale=float(h.abs().max()) if name == "dmask" else 0.0)
    return out


CASES = [
    # (B, H, Nq, Nk, D, Dv, mask, causal, packed)
    pytest.param(1, 1, 1, 1, 16, None, None, False, False, id="1x1"),
    pytest.param(2, 3, 17, 17, 40, None, None, True, True, id="packed-causal-D40"),
    pytest.param(2, 1, 17, 29, 64, None, "bool", False, False, id="bool-NqNk"),
    pytest.param(2, 2, 9, 13, 16, 24, "key_padding", False, False, id="key-padding-Dv"),
    pytest.param(2, 3, 13, 11, 16, None, "additive", False, False, id="additive-grad"),
    pytest.param(1, 3, 7, 19, 16, None, "additive_f32", False, False, id="additive-f32-broadcast"),
    pytest.param(1, 2, 20, 9, 32, None, None, True, False, id="causal-Nq>Nk"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,H,Nq,Nk,D,Dv,mask,causal,packed", CASES)
def test_matches_reference(backend, B, H, Nq, Nk, D, Dv, mask, causal, packed, dtype):
    q, k, v = _qkv(B, H, Nq, Nk, D, dtype, Dv=Dv, packed=packed)
    _check(q, k, v, _mask(mask, B, H, Nq, Nk, dtype), causal, dtype)


def test_equals_aten(backend):
    """The same numbers as torch.nn.functional.scaled_dot_product_attention (ATen's own)."""
    q, k, v = _qkv(2, 3, 17, 23, 40, torch.float32)
    m = _mask("key_padding", 2, 3, 17, 23, torch.float32)
    for kw in (dict(), dict(attn_mask=m), dict(is_causal=True), dict(scale=0.3)):
        torch.testing.assert_close(attnkern.scaled_dot_product_attention(q, k, v, **kw),
                                   F.scaled_dot_product_attention(q, k, v, **kw), rtol=2e-5, atol=2e-6)


def test_fully_masked_rows(backend):
    q, k, v = _qkv(2, 1, 5, 6, 16, torch.float32)
    m = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    m[1, 0, 2] = False
    q.requires_grad_()
    out = attnkern.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert torch.equal(out[1, 0, 2], torch.zeros(16))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[1, 0, 2], torch.zeros(16))


def test_deterministic(backend):
    q, k, v = _qkv(2, 2, 33, 33, 32, torch.float32, packed=True)
    dout = torch.randn(2, 2, 33, 32)
    a_out, a_g = _run(attnkern.scaled_dot_product_attention, q, k, v, None, True, dout)
    b_out, b_g = _run(attnkern.scaled_dot_product_attention, q, k, v, None, True, dout)
    assert torch.equal(a_out, b_out)
    for a, b in zip(a_g, b_g):
        assert torch.equal(a, b)


def test_dropout_is_handed_to_aten(backend):
    q, k, v = _qkv(1, 2, 64, 64, 16, torch.float32)
    torch.manual_seed(7)
    a = attnkern.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    if backend != "reference":
        torch.testing.assert_close(a, b)
    assert not torch.allclose(a, attnkern.scaled_dot_product_attention(q, k, v))


def test_scale_default_and_explicit(backend):
    q, k, v = _qkv(1, 1, 5, 5, 16, torch.float32)
    torch.testing.assert_close(attnkern.scaled_dot_product_attention(q, k, v),
                               attnkern.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(16)))
    torch.testing.assert_close(attnkern.scaled_dot_product_attention(q, k, v, scale=2.0),
                               ref.scaled_dot_product_attention(q, k, v, scale=2.0), rtol=1e-5, atol=1e-6)


def test_float64_and_large_head_dims_fall_back_to_the_reference(monkeypatch):
    from attnkern.ops import attention as op

    q, k, v = _qkv(1, 1, 4, 4, 8, torch.float64)
    assert op.pick_backend(q, v) == "cpu"
    monkeypatch.setenv("ATTNKERN_BACKEND", "triton")
    pytest.importorskip("triton")
    with pytest.raises(RuntimeError, match="do not take torch.float64"):
        attnkern.scaled_dot_product_attention(q, k, v)
    q, k, v = _qkv(1, 1, 4, 4, 264, torch.float32)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        attnkern.scaled_dot_product_attention(q, k, v)


def test_gradcheck_float64():
    """gradcheck in float64 where it applies: the cpu backend (ATen) and the reference."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 4, 5, 3, torch.float64))
    m = torch.randn(1, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v, m: attnkern.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert torch.autograd.gradcheck(f, (q, k, v, m))


def _triton_ready():
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("the triton op needs a GPU or TRITON_INTERPRET=1")


def test_opcheck_flash_attention():
    _triton_ready()
    from attnkern.ops import attention as op  # noqa: F401  (registers the ops)

    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 9, 7, 16, torch.float32))
    mask = torch.randn(1, 1, 9, 7, requires_grad=True)
    for m, causal in ((None, False), (None, True), (mask, False)):
        torch.library.opcheck(torch.ops.attnkern.flash_attention.default, (q, k, v, m, causal, 0.25))


def test_compile_fullgraph(backend):
    q, k, v = _qkv(1, 2, 9, 9, 16, torch.float32, packed=True)
    mask = _mask("key_padding", 1, 2, 9, 9, torch.float32)

    def f(q, k, v):
        return attnkern.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*qs)
    out.sum().backward()
    ref_out, ref_g = _run(lambda q, k, v, attn_mask, is_causal: f(q, k, v), q, k, v, None, False,
                          torch.ones_like(out))
    torch.testing.assert_close(out, ref_out)
    for a, b in zip([t.grad for t in qs], ref_g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call,err,match", [
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q[0], k, v), ValueError, "q must be a 4-D tensor"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k[..., :8], v), ValueError, "same head dim"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k, v[:, :, :3]), ValueError, "v must be"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k.half(), v), TypeError, "one dtype"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q.int(), k, v), TypeError, "q must be float32"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(5)), ValueError,
     "does not broadcast"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(2, 7, 5)), ValueError,
     "does not broadcast"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(7, 5).half()),
     TypeError, "attn_mask must be bool, float32"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(7, 5, dtype=torch.bool),
                                                           is_causal=True), ValueError, "not both"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k, v.to("meta")), ValueError, "one device"),
    (lambda q, k, v: attnkern.scaled_dot_product_attention(q, k[:1], v[:1]), ValueError, "batch and heads"),
])
def test_bad_input(call, err, match):
    q, k, v = _qkv(2, 3, 7, 5, 16, torch.float32)
    with pytest.raises(err, match=match):
        call(q, k, v)


def test_export_keeps_one_aten_sdpa_node():
    """While exporting, the op is ATen's SDPA (one standard node, no custom op, no N x N)."""

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return attnkern.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = _qkv(1, 2, 9, 9, 16, torch.float32)
    ep = torch.export.export(M(), (q, k, v))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("scaled_dot_product" in t for t in targets), targets
    assert not any("attnkern" in t for t in targets), targets
    torch.testing.assert_close(ep.module()(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
