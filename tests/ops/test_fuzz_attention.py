"""Property tests of scaled dot-product attention with hypothesis: random batch, heads, lengths
(1s and primes), head dims, dtypes, strides (packed qkv views, transposed storage, expanded
batch) and masks (boolean, additive, key padding, causal), on every backend, forward and
gradients against the reference under tests/tolerance.py's rule; and special values: NaN/Inf
in the inputs give the reference's NaN pattern, huge logits do not overflow in float16.
Example counts are bounded (CI time); the Triton interpreter gets the fewest, smallest cases.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkern
from attnkern.reference import attention as ref
from tests.tolerance import assert_close, flash_grads_from_rounded_output, worse

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
EXAMPLES = {"cpu": 40, "reference": 15, "triton": 12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def problems(draw, small):
    lens = [1, 2, 3, 5, 7, 13, 17] if small else [1, 2, 3, 5, 7, 13, 17, 31, 64, 67]
    B = draw(st.sampled_from([1, 2, 3]))
    H = draw(st.sampled_from([1, 2, 3]))
    Nq = draw(st.sampled_from(lens))
    Nk = draw(st.sampled_from(lens))
    D = draw(st.sampled_from([1, 3, 8, 16, 24, 40] if small else [1, 3, 8, 16, 24, 40, 64, 80]))
    Dv = draw(st.sampled_from([D, D, 5]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded_batch", "sliced"]))
    mask = draw(st.sampled_from([None, "causal", "bool", "additive", "key_padding"]))
    scale = draw(st.sampled_from([None, 0.05, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return B, H, Nq, Nk, D, Dv, dtype, layout, mask, scale, seed


def _tensor(shape, layout, dtype, g):
    B = shape[0]
    if layout == "transposed":  # storage [B, N, H, D]: the ViT layout before the head permute
        t = torch.randn(B, shape[2], shape[1], shape[3], generator=g).to(dtype).transpose(1, 2)
    elif layout == "expanded_batch":  # one tensor broadcast over the batch (stride 0)
        t = torch.randn(1, *shape[1:], generator=g).to(dtype).expand(*shape)
    elif layout == "sliced":  # a view with gaps in every dimension
        big = torch.randn(shape[0], shape[1] + 1, shape[2] + 2, shape[3] + 3, generator=g).to(dtype)
        t = big[:, 1:, 2:, :shape[3]]
    else:
        t = torch.randn(*shape, generator=g).to(dtype)
    assert t.shape == shape
    return t


def _make(B, H, Nq, Nk, D, Dv, dtype, layout, mask, seed):
    g = torch.Generator().manual_seed(seed)
    q = _tensor((B, H, Nq, D), layout, dtype, g)
    k = _tensor((B, H, Nk, D), layout, dtype, g)
    v = _tensor((B, H, Nk, Dv), layout, dtype, g)
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, Nq, Nk, generator=g) > 0.3
    elif mask == "additive":
        m = (3 * torch.randn(H, Nq, Nk, generator=g)).to(dtype)
    elif mask == "key_padding":
        lengths = torch.randint(1, Nk + 1, (B,), generator=g)
        m = (torch.arange(Nk)[None] < lengths[:, None]).view(B, 1, 1, Nk)
    dout = torch.randn(B, H, Nq, Dv, generator=g).to(dtype)
    return q, k, v, m, dout


def _grads(fn, q, k, v, m, causal, scale, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    mm = m.detach().clone().requires_grad_() if m is not None and m.is_floating_point() else m
    out = fn(q, k, v, attn_mask=mm, is_causal=causal, scale=scale)
    out.backward(dout)
    return [out, q.grad, k.grad, v.grad] + ([mm.grad] if mm is not None and mm.is_floating_point() else [])


def _aten_math(q, k, v, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


def _check(backend, problem, monkeypatch):
    B, H, Nq, Nk, D, Dv, dtype, layout, mask, scale, seed = problem
    monkeypatch.setenv("ATTNKERN_BACKEND", backend)
    q, k, v, m, dout = _make(B, H, Nq, Nk, D, Dv, dtype, layout, mask, seed)
    causal = mask == "causal"
    ours = _grads(attnkern.scaled_dot_product_attention, q, k, v, m, causal, scale, dout)
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    up = lambda t: None if t is None else (t if t.dtype == torch.bool else t.to(hi))
    high = _grads(ref.scaled_dot_product_attention, up(q), up(k), up(v), up(m), causal, scale, up(dout))
    if dtype == torch.float32:  # the same-dtype reference: ATen's math SDPA, a second implementation
        lowp = _aten_math
    else:
        lowp = lambda *a, **kw: ref.scaled_dot_product_attention(*a, upcast=False, **kw)
    same = _grads(lowp, q, k, v, m, causal, scale, dout)
    if dtype != torch.float32:  # or, as FlashAttention, delta from the output rounded to dtype
        flash = flash_grads_from_rounded_output(q, k, v, ours[0], dout, m, causal, scale)
        same[1:4] = [worse(h, a, b) for h, a, b in zip(high[1:4], same[1:4], flash)]
    for i, (name, a, h, s) in enumerate(zip(["out", "dq", "dk", "dv", "dmask"], ours, high, same)):
        # the mask's gradient dS has entries that cancel to ~0: its floor scales with its largest entry
        assert_close(a, h, s, dtype=dtype, grad=i > 0, name=f"{name} {problem}",
                     scale=float(h.abs().max()) if name == "dmask" else 0.0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fuzz_against_reference(backend, monkeypatch):
    @settings(max_examples=EXAMPLES[backend], **SETTINGS)
    @given(problems(small=False))
    def run(problem):
        _check(backend, problem, monkeypatch)

    run()


def test_fuzz_triton_against_reference(monkeypatch):
    pytest.importorskip("triton")

    @settings(max_examples=EXAMPLES["triton"], **SETTINGS)
    @given(problems(small=True))
    def run(problem):
        _check("triton", problem, monkeypatch)

    run()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_special_values_follow_the_reference(backend, where, value, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ATTNKERN_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 1, 2, 3] = value
    out = attnkern.scaled_dot_product_attention(q, k, v)
    expect = ref.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.equal(torch.isnan(out), torch.isnan(expect)), (out, expect)
    finite = torch.isfinite(expect)
    torch.testing.assert_close(out[finite], expect[finite].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_huge_logits_do_not_overflow_in_float16(backend, monkeypatch):
    """Scores of about 6e4 (float16's largest is 65504) are formed in float32: no Inf, no NaN."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("ATTNKERN_BACKEND", backend)
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 1, 8, 16, generator=g) * 60).half()
    k = (torch.randn(1, 1, 8, 16, generator=g) * 60).half()
    v = torch.randn(1, 1, 8, 16, generator=g).half()
    out = attnkern.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert torch.isfinite(out).all()
    expect = ref.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=1.0)
    torch.testing.assert_close(out.float(), expect, rtol=2e-3, atol=2e-3)
