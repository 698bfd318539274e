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
from tests.backends import forced_backend_fixture

backend = forced_backend_fixture("cpu", "triton", "reference")


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


def _sdpa(*args, **kwargs):
    return attnkern.scaled_dot_product_attention(*args, **kwargs)


# The exception type of each misuse is the one torch's own SDPA raises for it (checked against
# torch in test_bad_input_raises_what_torch_raises below).
BAD_INPUTS = [
    ("1-D query", lambda q, k, v: _sdpa(q[0, 0, 0], k, v), RuntimeError, "at least 2 dimensions"),
    ("head dims differ", lambda q, k, v: _sdpa(q, k[..., :8], v), RuntimeError, "same head dim"),
    ("v has other tokens", lambda q, k, v: _sdpa(q, k, v[:, :, :3]), RuntimeError, "same number of tokens"),
    ("dtypes differ", lambda q, k, v: _sdpa(q, k.half(), v), RuntimeError, "one dtype"),
    ("int input", lambda q, k, v: _sdpa(q.int(), k.int(), v.int()), RuntimeError, "query must be float32"),
    ("mask does not broadcast", lambda q, k, v: _sdpa(q, k, v, attn_mask=torch.zeros(2, 7, 4)),
     RuntimeError, "does not broadcast"),
    ("mask rank above the output's", lambda q, k, v: _sdpa(q, k, v, attn_mask=torch.zeros(1, 1, 1, 7, 5)),
     RuntimeError, "does not broadcast"),
    ("half mask for float32", lambda q, k, v: _sdpa(q, k, v, attn_mask=torch.zeros(7, 5).half()),
     RuntimeError, "attn_mask must be bool, float32"),
    ("int mask", lambda q, k, v: _sdpa(q, k, v, attn_mask=torch.zeros(7, 5, dtype=torch.int32)),
     RuntimeError, "attn_mask must be bool, float32"),
    ("mask with is_causal", lambda q, k, v: _sdpa(q, k, v, attn_mask=torch.ones(7, 5, dtype=torch.bool),
                                                 is_causal=True), RuntimeError, "not both"),
    ("dropout_p above 1", lambda q, k, v: _sdpa(q, k, v, dropout_p=2.0), RuntimeError, "dropout_p"),
    ("dropout_p below 0", lambda q, k, v: _sdpa(q, k, v, dropout_p=-0.1), RuntimeError, "dropout_p"),
    ("devices differ", lambda q, k, v: _sdpa(q, k, v.to("meta")), RuntimeError, "one device"),
    ("batch does not broadcast", lambda q, k, v: _sdpa(q, k[:, :2], v[:, :2]), RuntimeError, "do not broadcast"),
    ("gqa heads do not divide", lambda q, k, v: _sdpa(q, k[:, :2], v[:, :2], enable_gqa=True), RuntimeError,
     "must divide"),
    ("scale of the wrong type", lambda q, k, v: _sdpa(q, k, v, scale="a"), TypeError, "scale"),
    ("query not a tensor", lambda q, k, v: _sdpa(q.tolist(), k, v), TypeError, "query must be a torch.Tensor"),
    ("CausalBias with is_causal",
     lambda q, k, v: _sdpa(q, k, v, attn_mask=torch.nn.attention.bias.causal_lower_right(7, 5), is_causal=True),
     ValueError, "CausalBias"),
    ("CausalBias of other lengths",
     lambda q, k, v: _sdpa(q, k, v, attn_mask=torch.nn.attention.bias.causal_lower_right(7, 6)),
     RuntimeError, "CausalBias is for 7 queries and 6 keys"),
]


@pytest.mark.parametrize("what,call,err,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, call, err, match):
    q, k, v = _qkv(2, 3, 7, 5, 16, torch.float32)
    with pytest.raises(err, match=match):
        call(q, k, v)


# torch's CPU kernel reads past v instead of raising when v has fewer tokens than k
TORCH_RAISES = [b for b in BAD_INPUTS if b[0] != "v has other tokens"]


@pytest.mark.parametrize("what,call,err,match", TORCH_RAISES, ids=[b[0] for b in TORCH_RAISES])
def test_bad_input_raises_what_torch_raises(what, call, err, match, monkeypatch):
    """The same misuse given to torch's SDPA raises the same exception type."""
    import attnkern.functional as AF

    q, k, v = _qkv(2, 3, 7, 5, 16, torch.float32)
    monkeypatch.setattr(AF, "scaled_dot_product_attention", F.scaled_dot_product_attention)
    monkeypatch.setattr(attnkern, "scaled_dot_product_attention", F.scaled_dot_product_attention)
    with pytest.raises(err):
        call(q, k, v)


def test_unknown_tensor_subclass_is_refused():
    """A tensor subclass that resolves its meaning in Python is never read as a plain tensor."""

    class Placeholder(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    q, k, v = _qkv(1, 2, 4, 4, 8, torch.float32)
    m = torch.zeros(4, 4).as_subclass(Placeholder)
    with pytest.raises(TypeError, match="tensor subclass attnkern does not know"):
        _sdpa(q, k, v, attn_mask=m)
    with pytest.raises(TypeError, match="tensor subclass attnkern does not know"):
        _sdpa(q.as_subclass(Placeholder), k, v)
    with pytest.raises(TypeError, match="tensor subclass attnkern does not know"):
        attnkern.explain.attention_received(q, k, attn_mask=m)
    p = torch.nn.Parameter(q.clone())  # a Parameter is a plain tensor
    assert _sdpa(p, k, v).shape == q.shape




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


# ------------------------------------------------------------------------------------------
# huge finite additive masks (finfo.min / -1e9 fills instead of -inf)
# ------------------------------------------------------------------------------------------

def _filled_mask(fill, Nq, Nk, dtype, full_rows=(4,), pad_from=9, shape=(1, 2)):
    """An additive mask with ``fill`` on keys ``pad_from..`` of every row and on every key of
    the query rows ``full_rows`` (as codes that pad with finfo.min or -1e9 build it)."""
    m = torch.zeros(*shape, Nq, Nk, dtype=dtype)
    m[..., pad_from:] = fill
    for r in full_rows:
        m[..., r, :] = fill
    return m


def _definition64(q, k, v, mask, scale=None, score_dtype=torch.float64):
    """softmax(q k^T * scale + mask) @ v in float64, with the scores S rounded to
    ``score_dtype`` after the mask is added (float32: as every float32-accumulating kernel
    forms them; a -1e9 fill absorbs q.k there). Rows are the softmax of the finite scores."""
    d = torch.float64
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.to(d) @ k.to(d).transpose(-2, -1)) * scale + mask.to(d)
    s = s.to(score_dtype).to(d)
    return torch.softmax(s, dim=-1) @ v.to(d)


@pytest.mark.parametrize("fill", ["finfo_min", "-1e9"])
def test_finite_fill_issue_case(backend, fill):
    """q [1, 2, 5, 16], k and v [1, 2, 12, 16] (float32); finfo(float32).min (or -1e9) on
    keys 9..11 of every row and on every key of row 4: row 4 is the plain mean of v (the
    fill absorbs q.k in the float32 scores), the others the softmax over keys 0..8. Output and
    gradients against the float64 autograd of the definition with the scores formed in float32
    (for finfo.min the float64 scores give the same; for -1e9 float64 would keep q.k)."""
    q, k, v = _qkv(1, 2, 5, 12, 16, torch.float32, seed=21)
    value = torch.finfo(torch.float32).min if fill == "finfo_min" else -1e9
    mask = _filled_mask(value, 5, 12, torch.float32)
    dout = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(24))
    out, grads = _run(attnkern.scaled_dot_product_attention, q, k, v, mask, False, dout)
    want, want_grads = _run(lambda q, k, v, attn_mask, is_causal: _definition64(q, k, v, attn_mask,
                                                                               score_dtype=torch.float32),
                            q.double(), k.double(), v.double(), mask.double(), False, dout.double())
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(out[:, :, 4], v.double().mean(dim=2), dtype=torch.float32, name="row 4 = mean of v")
    assert_close(out, want, dtype=torch.float32, name="out")
    for name, a, b in zip(["dq", "dk", "dv", "dmask"], grads, want_grads):
        assert_close(a, b, dtype=torch.float32, grad=True, name=name)
    if fill == "finfo_min":  # here the float64 scores are the float32 ones: the plain rule too
        _check(q, k, v, mask, False, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_finite_fill_of_the_input_dtype(backend, dtype):
    """A mask in q's half dtype filled with that dtype's finfo.min (-65504 for float16, where
    q.k survives the sum; -3.39e38 for bfloat16, where it does not), fully and partly masked
    rows, over several key blocks; forward and gradients under the tolerance rule."""
    q, k, v = _qkv(2, 2, 33, 40, 16, dtype, seed=22)
    mask = _filled_mask(torch.finfo(dtype).min, 33, 40, dtype, full_rows=(0, 17, 32), pad_from=29, shape=(2, 1))
    _check(q, k, v, mask, False, dtype)


def test_finite_fill_key_padding_partly_masked(backend):
    """The common key-padding form [B, 1, 1, N_k] with finfo.min: no row is fully masked, so
    every row is the softmax over its unpadded keys, bitwise-equal in meaning to -inf."""
    q, k, v = _qkv(3, 2, 17, 21, 16, torch.float32, seed=23)
    lengths = torch.tensor([21, 5, 1])
    keep = (torch.arange(21)[None, :] < lengths[:, None]).view(3, 1, 1, 21)
    fill = torch.zeros(3, 1, 1, 21).masked_fill(~keep, torch.finfo(torch.float32).min)
    out = _check(q, k, v, fill, False, torch.float32)
    assert_close(out, attnkern.scaled_dot_product_attention(q, k, v, attn_mask=keep).double(),
                 dtype=torch.float32, name="finfo.min fill against the boolean mask")


# ------------------------------------------------------------------------------------------
# torch's signature: keyword names, enable_gqa, any rank, CausalBias
# ------------------------------------------------------------------------------------------

def test_signature_is_torchs():
    import inspect

    params = inspect.signature(attnkern.scaled_dot_product_attention).parameters
    assert [(p.name, p.default) for p in params.values()] == [
        ("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty), ("value", inspect.Parameter.empty),
        ("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False)]


def _check_general(q, k, v, dtype, seed=3, **kw):
    """Forward and gradients of q, k, v against the reference's autograd in the higher
    precision (and in ``dtype``), for arguments the reference takes as torch does."""
    g = torch.Generator().manual_seed(seed)
    out0 = ref.scaled_dot_product_attention(q, k, v, **kw)
    dout = torch.randn(out0.shape, generator=g).to(dtype)

    def run(fn, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        out = fn(*ts, **kw)
        out.backward(dout.to(out.dtype))
        return out, [t.grad for t in ts]

    out, grads = run(attnkern.scaled_dot_product_attention, (q, k, v))
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    h_out, h_grads = run(ref.scaled_dot_product_attention, [t.to(hi) for t in (q, k, v)])
    s_out, s_grads = None, [None] * 3
    if dtype != torch.float32:
        s_out, s_grads = run(lambda *a, **kw: ref.scaled_dot_product_attention(*a, upcast=False, **kw), (q, k, v))
    assert out.shape == h_out.shape and out.dtype == dtype
    assert_close(out, h_out, s_out, dtype=dtype, name="out")
    for name, a, h, s in zip(["dq", "dk", "dv"], grads, h_grads, s_grads):
        assert a.shape == h.shape, name
        assert_close(a, h, s, dtype=dtype, grad=True, name=name)
    return out


@pytest.mark.parametrize("shapes,causal", [
    (((1, 8, 6, 16), (1, 2, 6, 16)), False),      # the issue's case
    (((2, 4, 33, 16), (2, 2, 40, 16)), True),     # several blocks, N_q != N_k, causal
    (((2, 6, 17, 16), (2, 3, 17, 16)), False),
], ids=["issue-8q2kv", "4q2kv-causal", "6q3kv"])
def test_grouped_query_attention(backend, shapes, causal):
    qs, ks = shapes
    g = torch.Generator().manual_seed(31)
    q, k, v = torch.randn(qs, generator=g), torch.randn(ks, generator=g), torch.randn(ks, generator=g)
    out = _check_general(q, k, v, torch.float32, enable_gqa=True, is_causal=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
                               atol=1e-5, rtol=1e-4)


def test_grouped_query_attention_half(backend):
    g = torch.Generator().manual_seed(32)
    q = torch.randn(1, 4, 20, 32, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, 1, 25, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    _check_general(q, k, v, torch.bfloat16, enable_gqa=True)


def test_grouped_query_attention_reads_kv_heads_in_place(monkeypatch):
    """On the Triton path the kernels get k and v with their own head count (nothing repeated)."""
    pytest.importorskip("triton")
    from attnkern.triton import attention as ta

    monkeypatch.setenv("ATTNKERN_BACKEND", "triton")
    seen = []
    fwd = ta.attention_fwd
    monkeypatch.setattr(ta, "attention_fwd", lambda q, k, v, *a, **kw: (seen.append((q.shape, k.shape)),
                                                                        fwd(q, k, v, *a, **kw))[1])
    q, k, v = torch.randn(1, 8, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    attnkern.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert seen == [(torch.Size([1, 8, 6, 16]), torch.Size([1, 2, 6, 16]))]


@pytest.mark.parametrize("shapes", [
    ((3, 5, 16), (3, 7, 16), (3, 7, 8)),                          # (H, L, E)
    ((2, 2, 3, 5, 16), (2, 2, 3, 7, 16), (2, 2, 3, 7, 16)),       # (B, G, H, L, E)
    ((2, 3, 5, 16), (1, 3, 7, 16), (1, 1, 7, 16)),                # broadcast batch and heads
    ((5, 16), (7, 16), (7, 16)),                                  # (L, E)
    ((2, 1, 3, 5, 16), (4, 3, 7, 16), (4, 3, 7, 16)),             # ranks 5 and 4 broadcast
], ids=["3d", "5d", "broadcast", "2d", "5d-4d"])
def test_ranks_and_broadcast(backend, shapes):
    g = torch.Generator().manual_seed(33)
    q, k, v = (torch.randn(s, generator=g) for s in shapes)
    out = _check_general(q, k, v, torch.float32)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-4)


def test_rank5_gqa_and_mask(backend):
    g = torch.Generator().manual_seed(34)
    q = torch.randn(2, 2, 4, 9, 16, generator=g)
    k, v = (torch.randn(2, 2, 2, 11, 16, generator=g) for _ in range(2))
    mask = torch.randn(2, 1, 4, 9, 11, generator=g)
    out = attnkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    expect = ref.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask.double(), enable_gqa=True)
    assert_close(out, expect, ref.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True), dtype=torch.float32)


@pytest.mark.parametrize("variant,Nq,Nk", [("upper_left", 33, 33), ("lower_right", 17, 40),
                                           ("lower_right", 40, 17), ("upper_left", 20, 9)],
                         ids=["ul-33x33", "lr-17x40", "lr-40x17", "ul-20x9"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_causal_bias(backend, variant, Nq, Nk, dtype):
    """torch.nn.attention.bias.CausalBias as attn_mask: honoured by its variant (never read as a
    tensor), against the reference with the explicit boolean mask; rows that see no key (lower-
    right with N_q > N_k) are zeros, as every other fully masked row."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    q, k, v = _qkv(2, 2, Nq, Nk, 16, dtype, seed=35)
    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(Nq, Nk)
    keep = ref.causal_mask(Nq, Nk, lower_right=variant == "lower_right")
    dout = torch.randn(2, 2, Nq, 16, generator=torch.Generator().manual_seed(36)).to(dtype)

    def run(fn, ts, mask):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        out = fn(*ts, attn_mask=mask)
        out.backward(dout.to(out.dtype))
        return out, [t.grad for t in ts]

    got, got_g = run(attnkern.scaled_dot_product_attention, (q, k, v), bias)
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    h, h_g = run(ref.scaled_dot_product_attention, [t.to(hi) for t in (q, k, v)], keep)
    s, s_g = None, [None] * 3
    if dtype != torch.float32:
        s, s_g = run(lambda *a, **kw: ref.scaled_dot_product_attention(*a, upcast=False, **kw), (q, k, v), keep)
    assert torch.isfinite(got).all()
    assert_close(got, h, s, dtype=dtype, name="out")
    for name, a, b, c in zip(["dq", "dk", "dv"], got_g, h_g, s_g):
        assert_close(a, b, c, dtype=dtype, grad=True, name=name)
    if variant == "lower_right" and Nq > Nk:  # rows that see no key
        assert (got[:, :, :Nq - Nk] == 0).all()


@pytest.mark.parametrize("variant,Nk", [("upper_left", 64), ("lower_right", 128)])
def test_causal_bias_issue_cases(backend, variant, Nk):
    """The reported cases: causal_upper_left(64, 64) and causal_lower_right(64, 128) with
    torch.rand q [2, 2, 64, 16] fp16 (k, v of Nk tokens): the bias is honoured, never read as
    memory (no NaN, no garbage), forward and gradients against the explicit mask."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    g = torch.Generator().manual_seed(37)
    q = torch.rand(2, 2, 64, 16, generator=g).half()
    k, v = (torch.rand(2, 2, Nk, 16, generator=g).half() for _ in range(2))
    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(64, Nk)
    keep = ref.causal_mask(64, Nk, lower_right=variant == "lower_right")
    dout = torch.rand(2, 2, 64, 16, generator=g).half()
    got, got_g = _run(lambda q, k, v, attn_mask, is_causal: attnkern.scaled_dot_product_attention(
        q, k, v, attn_mask=bias), q, k, v, None, False, dout)
    h, h_g = _run(ref.scaled_dot_product_attention, q.float(), k.float(), v.float(), keep, False, dout.float())
    s, s_g = _run(lambda *a, **kw: ref.scaled_dot_product_attention(*a, upcast=False, **kw), q, k, v, keep, False, dout)
    assert torch.isfinite(got).all()
    assert_close(got, h, s, dtype=torch.float16, name="out")
    for name, a, b, c in zip(["dq", "dk", "dv"], got_g, h_g, s_g):
        assert_close(a, b, c, dtype=torch.float16, grad=True, name=name)
