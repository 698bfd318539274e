"""The Triton flash-attention kernels against the reference.

Without a GPU they run under Triton's interpreter on CPU tensors: the root conftest sets
``TRITON_INTERPRET=1`` before triton is first imported. Under the interpreter the kernels use
small fixed tiles (see ``_INTERP_*`` in the module: 32 x 16 and 16 x 32), so the shapes below
(1, 17, 33, 50, 128, 200 tokens) cover single partial blocks, several blocks with ragged edges
and causal diagonals that cut tiles unevenly, at a cost the interpreter can afford.

Every comparison goes through :func:`tests.tolerance.assert_close`: float32 results against a
float64 reference (with the float32 reference's error as the allowance), float16/bfloat16
against the float32 reference (with the same-dtype reference's error as the allowance).
Gradients of the reference come from torch.autograd.
"""
import math
import os

import pytest
import torch

from attnkern.reference import attention as ref
from tests.tolerance import assert_close

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(scope="module")
def tk():
    from attnkern.triton import attention

    return attention


@pytest.fixture(scope="module")
def device():
    """CPU tensors under the interpreter, the GPU otherwise."""
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.fail("the triton kernels need a GPU or TRITON_INTERPRET=1")
    return torch.device("cuda")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _qkv(B, H, Nq, Nk, D, Dv, dtype, device, seed=0):
    g = _gen(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, H, Nk, D, generator=g)
    v = torch.randn(B, H, Nk, Dv, generator=g)
    return [t.to(dtype).to(device) for t in (q, k, v)]


def _make_mask(kind, B, H, Nq, Nk, dtype, device, seed=1):
    """(mask for the reference in its own broadcastable shape, additive mask for the kernel
    in the same shape, whether the kernel's additive mask may carry a gradient check)."""
    g = _gen(seed)
    if kind is None:
        return None, None
    if kind == "bool":  # per batch and query, shared by the heads
        m = torch.rand(B, 1, Nq, Nk, generator=g) > 0.3
        m[..., 0] = True  # no fully masked rows here (tested separately)
    elif kind == "keypad":  # [B, 1, 1, Nk]: batch b keeps its first lens[b] keys
        lens = [max(1, Nk - 7 * b - 3) for b in range(B)]
        m = torch.arange(Nk)[None, :] < torch.tensor(lens)[:, None]
        m = m[:, None, None, :]
    elif kind == "additive":  # float32, per head and query, shared by the batch; some -inf
        m = torch.randn(1, H, Nq, Nk, generator=g)
        m[torch.rand(1, H, Nq, Nk, generator=g) < 0.2] = float("-inf")
        m[..., 0] = 0.5
    elif kind == "additive_lowp":  # full-size, in q's dtype
        m = torch.randn(B, H, Nq, Nk, generator=g).to(dtype)
    else:
        raise AssertionError(kind)
    m = m.to(device)
    mask_dtype = dtype if kind == "additive_lowp" else F32
    add = ref.additive_mask(m, False, Nq, Nk, mask_dtype, device)
    return m, add


def _reference(q, k, v, attn_mask, is_causal, scale, do, dtype, mask_grad=False, gqa=False):
    """(high-precision results, same-dtype results or None): each a dict of o, lse, dq, dk, dv
    and dmask (the gradient of ``attn_mask`` if ``mask_grad``); ``gqa``: k and v have fewer
    heads (repeated by the reference; their gradients summed over each group by autograd)."""
    hi = torch.float64 if dtype == F32 else F32

    def run(dt, upcast):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        m = attn_mask
        if mask_grad:
            m = attn_mask.detach().to(torch.float64 if dt == torch.float64 else F32).requires_grad_()
        o, lse = ref.scaled_dot_product_attention(*leaves, m, 0.0, is_causal, scale, gqa,
                                                  upcast=upcast, return_lse=True)
        o.backward(do.to(dt))
        r = dict(o=o.detach(), lse=lse.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
        if mask_grad:
            r["dmask"] = m.grad
        return r

    high = run(hi, True)
    low = run(dtype, dtype == F32) if dtype in (F32, F16, BF16) else None
    return high, low


def _compare(got, high, low, dtype, names):
    for name in names:
        a = got[name]
        assert a is not None, name
        assert torch.isfinite(a).all() or name == "lse", f"{name} has NaN or inf"
        assert_close(a, high[name], low[name], dtype=dtype, grad=name.startswith("d"), name=name)


def _run(tk, q, k, v, add, is_causal, scale, do, need_dmask=False):
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    full = add.expand(B, H, Nq, Nk) if add is not None else None
    o, stats = tk.attention_fwd(q, k, v, full, is_causal, scale)
    dq, dk, dv, dmask = tk.attention_bwd(do, q, k, v, o, stats, full, is_causal, scale, need_dmask)
    return dict(o=o, lse=tk.lse_of(stats), dq=dq, dk=dk, dv=dv, dmask=dmask)


def _sum_to(t, shape):
    """Sum a [B, H, Nq, Nk] gradient down to a broadcastable shape."""
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.sum(dims, keepdim=True) if dims else t


# ------------------------------------------------------------------------------------------
# the case matrix: a representative selection, not a product
# ------------------------------------------------------------------------------------------

# (B, H, Nq, Nk, D, Dv, dtype, mask kind, causal)
CASES = [
    (1, 1, 17, 17, 16, 16, F32, None, False),
    (2, 3, 17, 40, 40, 40, F32, None, False),
    (1, 2, 33, 17, 64, 64, F32, None, True),            # causal, Nq > Nk
    (2, 1, 17, 50, 40, 40, F32, None, True),            # causal, Nq < Nk
    (2, 1, 1, 1, 16, 16, F32, None, False),
    (1, 2, 1, 33, 16, 16, F32, None, True),             # one query: sees key 0 only
    (1, 1, 128, 128, 64, 64, F32, None, True),
    (1, 1, 200, 200, 64, 64, F32, "additive", False),
    (2, 1, 50, 33, 128, 128, F32, "bool", False),
    (2, 3, 33, 45, 16, 16, F32, "keypad", False),
    (1, 1, 200, 200, 64, 64, BF16, None, True),
    (2, 3, 33, 17, 40, 40, BF16, "bool", False),
    (1, 3, 50, 64, 64, 64, BF16, "keypad", False),
    (1, 2, 33, 50, 128, 128, BF16, "additive", False),
    (2, 1, 17, 128, 16, 16, BF16, None, False),
    (1, 1, 128, 128, 40, 40, F16, None, True),
    (2, 2, 17, 33, 64, 64, F16, "additive_lowp", False),
    (1, 3, 50, 50, 128, 128, F16, "bool", False),
    (2, 1, 45, 200, 16, 16, F16, "keypad", False),
    (1, 1, 1, 17, 64, 64, F16, None, False),
]


def _case_id(c):
    B, H, Nq, Nk, D, Dv, dtype, mask, causal = c
    return (f"{str(dtype)[6:]}-B{B}H{H}-{Nq}x{Nk}-D{D}" + (f"Dv{Dv}" if Dv != D else "")
            + (f"-{mask}" if mask else "") + ("-causal" if causal else ""))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(tk, device, case):
    B, H, Nq, Nk, D, Dv, dtype, kind, causal = case
    q, k, v = _qkv(B, H, Nq, Nk, D, Dv, dtype, device)
    m, add = _make_mask(kind, B, H, Nq, Nk, dtype, device)
    do = torch.randn(B, H, Nq, Dv, generator=_gen(7)).to(dtype).to(device)
    scale = 1.0 / math.sqrt(D)
    mask_grad = kind == "additive"
    got = _run(tk, q, k, v, add, causal, scale, do, need_dmask=mask_grad)
    assert got["o"].is_contiguous() and got["o"].dtype == dtype and got["lse"].dtype == F32
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        assert got[name].shape == t.shape and got[name].dtype == dtype and got[name].is_contiguous()
    high, low = _reference(q, k, v, m if kind != "additive" else add, causal, scale, do, dtype,
                           mask_grad=mask_grad)
    assert torch.equal(torch.isneginf(got["lse"]), torch.isneginf(high["lse"]))
    _compare(got, high, low, dtype, ["o", "lse", "dq", "dk", "dv"])
    if mask_grad:
        assert got["dmask"].shape == (B, H, Nq, Nk) and got["dmask"].dtype == F32
        got["dmask"] = _sum_to(got["dmask"], add.shape)
        _compare(got, high, low, dtype, ["dmask"])
    else:
        assert got["dmask"] is None


# ------------------------------------------------------------------------------------------
# head dims, scale, masks in q's dtype
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("D,Dv,dtype", [(256, 40, F32), (256, 256, BF16), (80, 96, F16), (3, 1, F32)],
                         ids=["D256-Dv40-float32", "D256-bfloat16", "D80-Dv96-float16", "D3-Dv1-float32"])
def test_head_dims(tk, device, D, Dv, dtype):
    B, H, Nq, Nk = 1, 2, 20, 35
    q, k, v = _qkv(B, H, Nq, Nk, D, Dv, dtype, device, seed=3)
    do = torch.randn(B, H, Nq, Dv, generator=_gen(4)).to(dtype).to(device)
    scale = 0.3  # not 1/sqrt(D)
    got = _run(tk, q, k, v, None, False, scale, do)
    high, low = _reference(q, k, v, None, False, scale, do, dtype)
    _compare(got, high, low, dtype, ["o", "lse", "dq", "dk", "dv"])


# ------------------------------------------------------------------------------------------
# strides: packed qkv projections, non-unit last strides, strided dO
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_packed_qkv_views_read_in_place(tk, device, dtype):
    B, N, H, D = 2, 33, 3, 40
    qkv = torch.randn(B, N, 3 * H * D, generator=_gen(5)).to(dtype).to(device)
    q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous() and q.data_ptr() != k.data_ptr()
    # dO with a non-unit last stride, and the key-padding mask as a stride-0 expanded view.
    do = torch.randn(B, H, N, 2 * D, generator=_gen(6)).to(dtype).to(device)[..., ::2]
    assert do.stride(-1) == 2
    m, add = _make_mask("keypad", B, H, N, N, dtype, device)
    got = _run(tk, q, k, v, add, False, 0.2, do)
    dense = _run(tk, q.contiguous(), k.contiguous(), v.contiguous(), add, False, 0.2, do.contiguous())
    # Same values loaded in the same order: bitwise equal under the interpreter and with tensor-core
    # dots. A float32 dot on a GPU runs on FMA units in an order that follows the operands' register
    # layout, which the compiler picks from their strides (dq of the strided views differed in the
    # last bits on an H200, triton 3.6): there the two runs agree within float32's floor.
    for name in ("o", "lse", "dq", "dk", "dv"):
        if INTERPRET or dtype != F32:
            assert torch.equal(got[name], dense[name]), name
        else:
            assert_close(got[name], dense[name], dtype=F32, name=f"{name} of the strided views")
    high, low = _reference(q, k, v, m, False, 0.2, do, dtype)
    _compare(got, high, low, dtype, ["o", "lse", "dq", "dk", "dv"])


def test_non_unit_last_stride(tk, device):
    B, H, Nq, Nk, D = 1, 2, 20, 30, 16
    g = _gen(8)
    q = torch.randn(B, H, Nq, 3 * D, generator=g).to(device)[..., ::3]
    k = torch.randn(B, H, D, Nk, generator=g).to(device).transpose(-1, -2)  # last stride Nk
    v = torch.randn(B, Nk, H, D, generator=g).to(device).permute(0, 2, 1, 3)
    assert q.stride(-1) == 3 and k.stride(-1) == Nk and v.stride(-1) == 1
    do = torch.randn(B, H, Nq, D, generator=g).to(device)
    got = _run(tk, q, k, v, None, True, 0.25, do)
    high, low = _reference(q, k, v, None, True, 0.25, do, F32)
    _compare(got, high, low, F32, ["o", "lse", "dq", "dk", "dv"])


# ------------------------------------------------------------------------------------------
# fully masked rows
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16"])
def test_fully_masked_rows_give_zeros(tk, device, dtype):
    """Key padding that masks every key of batch 1, and a per-query mask with two empty rows:
    o = 0, lse = -inf, no NaN, and those rows add nothing to any gradient."""
    B, H, Nq, Nk, D = 2, 2, 40, 23, 16
    q, k, v = _qkv(B, H, Nq, Nk, D, D, dtype, device, seed=9)
    do = torch.randn(B, H, Nq, D, generator=_gen(10)).to(dtype).to(device)
    keep = torch.ones(B, 1, Nq, Nk, dtype=torch.bool)
    keep[1] = False           # batch 1: every key padded away
    keep[0, :, 3] = False     # batch 0: query rows 3 and 35 see nothing
    keep[0, :, 35] = False
    keep[0, :, 10, 5:] = False
    keep = keep.to(device)
    add = ref.additive_mask(keep, False, Nq, Nk, F32, device)
    got = _run(tk, q, k, v, add, False, 0.25, do, need_dmask=True)
    for name, t in got.items():
        if name != "lse":
            assert not torch.isnan(t).any(), name
    empty = ~keep.any(-1).expand(B, H, Nq)
    assert torch.isneginf(got["lse"][empty]).all() and torch.isfinite(got["lse"][~empty]).all()
    assert (got["o"][empty] == 0).all() and (got["dq"][empty] == 0).all()
    assert (got["dmask"][empty.unsqueeze(-1).expand(B, H, Nq, Nk)] == 0).all()
    assert (got["dk"][1] == 0).all() and (got["dv"][1] == 0).all()
    high, low = _reference(q, k, v, keep, False, 0.25, do, dtype)
    _compare(got, high, low, dtype, ["o", "dq", "dk", "dv"])
    assert_close(got["lse"][~empty], high["lse"][~empty], low["lse"][~empty], dtype=dtype, name="lse")


def test_no_keys(tk, device):
    q, k, v = _qkv(1, 2, 5, 0, 16, 8, F32, device)
    o, stats = tk.attention_fwd(q, k, v, None, False, 0.25)
    assert o.shape == (1, 2, 5, 8) and (o == 0).all() and torch.isneginf(tk.lse_of(stats)).all()
    dq, dk, dv, _ = tk.attention_bwd(torch.ones_like(o), q, k, v, o, stats, None, False, 0.25, False)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


# ------------------------------------------------------------------------------------------
# the mask gradient
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,shape", [(F32, "full"), (BF16, "keypad")],
                         ids=["float32-full", "bfloat16-keypad"])
def test_mask_gradient(tk, device, dtype, shape):
    B, H, Nq, Nk, D = 2, 2, 33, 40, 16
    q, k, v = _qkv(B, H, Nq, Nk, D, D, dtype, device, seed=11)
    do = torch.randn(B, H, Nq, D, generator=_gen(12)).to(dtype).to(device)
    g = _gen(13)
    if shape == "full":
        add = torch.randn(B, H, Nq, Nk, generator=g).to(device)
    else:  # learned key bias, [B, 1, 1, Nk], with padded keys
        add = torch.randn(B, 1, 1, Nk, generator=g)
        add[1, ..., 30:] = float("-inf")
        add = add.to(device)
    got = _run(tk, q, k, v, add, False, 0.25, do, need_dmask=True)
    assert got["dmask"].shape == (B, H, Nq, Nk) and got["dmask"].is_contiguous()
    got["dmask"] = _sum_to(got["dmask"], add.shape)
    high, low = _reference(q, k, v, add, False, 0.25, do, dtype, mask_grad=True)
    _compare(got, high, low, dtype, ["o", "dmask", "dq", "dk", "dv"])
    if shape == "keypad":
        assert (got["dmask"][1, ..., 30:] == 0).all()


def test_mask_gradient_without_mask_and_causal(tk, device):
    """need_dmask with is_causal: dS is zero above the diagonal (blocks never visited) and
    equals dS of the same attention given the causal mask as an additive mask."""
    B, H, Nq, Nk, D = 1, 1, 40, 50, 16
    q, k, v = _qkv(B, H, Nq, Nk, D, D, F32, device, seed=14)
    do = torch.randn(B, H, Nq, D, generator=_gen(15)).to(device)
    causal = _run(tk, q, k, v, None, True, 0.25, do, need_dmask=True)
    add = ref.additive_mask(None, True, Nq, Nk, F32, device)[None, None]
    masked = _run(tk, q, k, v, add, False, 0.25, do, need_dmask=True)
    assert (causal["dmask"][..., ~ref.causal_mask(Nq, Nk, device)] == 0).all()
    assert_close(causal["dmask"], masked["dmask"], dtype=F32, name="dS")
    assert causal["dmask"].abs().max() > 0


# ------------------------------------------------------------------------------------------
# determinism and tile plans
# ------------------------------------------------------------------------------------------

def test_bitwise_reproducible(tk, device):
    B, H, Nq, Nk, D = 2, 2, 50, 70, 40
    q, k, v = _qkv(B, H, Nq, Nk, D, D, BF16, device, seed=16)
    _, add = _make_mask("additive", B, H, Nq, Nk, BF16, device)
    do = torch.randn(B, H, Nq, D, generator=_gen(17)).to(BF16).to(device)
    first = _run(tk, q, k, v, add, False, 0.2, do, need_dmask=True)
    second = _run(tk, q, k, v, add, False, 0.2, do, need_dmask=True)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two runs"


def test_fixed_tiles_when_deterministic(tk, monkeypatch):
    was = torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(tk, "_interpret", lambda: False)
    try:
        torch.use_deterministic_algorithms(False)
        assert not tk._use_fixed()
        torch.use_deterministic_algorithms(True)
        assert tk._use_fixed()
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the autotuned path runs in every other test")
def test_autotuned_path(tk, device, monkeypatch):
    """The launch path a GPU takes by default (autotuner: pruning, grid from the chosen tile,
    tuning keys), run under the interpreter with a stand-in timer (each config is launched
    once while "timed"); the results of the config it chooses must match the reference."""
    tuners = (tk._attn_fwd_tuned, tk._attn_bwd_dkv_tuned, tk._attn_bwd_dq_tuned)
    if not all(hasattr(type(t), "do_bench") and hasattr(t, "cache") for t in tuners):
        pytest.skip("this Triton's Autotuner has no do_bench/cache to stand in for")
    monkeypatch.setattr(tk, "_use_fixed", lambda: False)
    calls = []

    def fake_bench(fn, quantiles=None):
        fn()
        calls.append(1)
        return [float(len(calls) % 3), 0.0, 0.0]

    for t in tuners:
        monkeypatch.setitem(t.__dict__, "do_bench", fake_bench)
        monkeypatch.setattr(t, "cache", {})
    # float16: float32 gets its fixed tile alone (no choice to time)
    B, H, Nq, Nk, D = 1, 2, 40, 50, 64
    q, k, v = _qkv(B, H, Nq, Nk, D, D, F16, device, seed=18)
    do = torch.randn(B, H, Nq, D, generator=_gen(19)).to(device, F16)
    got = _run(tk, q, k, v, None, True, 0.125, do, need_dmask=True)
    assert len(calls) > 3 and all(len(t.cache) == 1 for t in tuners)
    high, low = _reference(q, k, v, None, True, 0.125, do, F16)
    _compare(got, high, low, F16, ["o", "lse", "dq", "dk", "dv"])


def test_tile_plans_fit_the_gpu(tk, monkeypatch):
    """The fixed fp16/bf16 GPU tiles fit the shared-memory estimate for every head dim, the
    autotune pruning keeps only configs within both budgets (a fallback when none fits), and
    D = 256 gets small tiles. (float32's fixed tiles are judged by ptxas alone, in
    test_compile_targets.py: on the FMA path of tl.dot the estimate overstates their shared
    memory: 164 KiB for the 32x16, 2-stage dK/dV tile at D = 256, which compiles to 98 KiB.)"""
    monkeypatch.setattr(tk, "_interpret", lambda: False)
    q16 = torch.empty(1, dtype=F16)
    q32 = torch.empty(1, dtype=F32)
    plans = [(tk._fixed_fwd, tk._smem_fwd, tk._regs_fwd, tk._attn_fwd_tuned),
             (tk._fixed_dkv, tk._smem_dkv, tk._regs_dkv, tk._attn_bwd_dkv_tuned),
             (tk._fixed_dq, tk._smem_dq, tk._regs_dq, tk._attn_bwd_dq_tuned)]
    for fixed, smem, regs, tuned in plans:
        prune, configs = tuned.early_config_prune, tuned.configs
        for bd in (16, 32, 64, 128, 256):
            for bdv in (16, 64, 256):
                for q in (q16, q32):
                    es = q.element_size()
                    f = fixed(bd, bdv, es)
                    if es == 2:
                        assert smem(f, bd, bdv, es) <= tk._SMEM_FALLBACK, (fixed.__name__, bd, bdv, es)
                    kept = prune(configs, {"Q": q}, BLOCK_D=bd, BLOCK_DV=bdv)
                    assert 1 <= len(kept) <= 8
                    if es == 4:  # float32: the fixed tile alone
                        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                                for c in kept] == [tuple(f)]
                    for c in kept:
                        t = tk._Fixed(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                        if len(kept) > 1 or t != f:
                            assert smem(t, bd, bdv, es) * tk._SMEM_MARGIN <= tk._SMEM_FALLBACK
                            assert regs(t, bd, bdv, es) <= tk._REG_BUDGET
                    if bd == 256:
                        assert f.block_m * f.block_n <= 64 * 32


def test_pruner_drops_configs_that_do_not_compile_within_the_device(tk, monkeypatch):
    """On a GPU each candidate the estimates keep is compiled first; one that spills registers or
    exceeds the shared memory per block (False) is dropped, one the probe cannot judge (None)
    stays, at most 8 are kept, largest tiles first, and when every candidate is dropped the
    pruner falls back to the fixed tile (``prune.fallback``)."""
    monkeypatch.setattr(tk, "_interpret", lambda: False)
    q16 = torch.empty(1, dtype=F16)
    for tuned, name in ((tk._attn_fwd_tuned, "_attn_fwd_kernel"),
                        (tk._attn_bwd_dkv_tuned, "_attn_bwd_dkv_kernel"),
                        (tk._attn_bwd_dq_tuned, "_attn_bwd_dq_kernel")):
        prune = tuned.early_config_prune
        kw = dict(BLOCK_D=64, BLOCK_DV=64, HAS_MASK=True, grid=None, warmup=False)
        tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        monkeypatch.setattr(tk, "_fits_compiled", lambda *a: None)
        by_estimate = [tile(c) for c in prune(tuned.configs, {"Q": q16}, **kw)]
        assert len(by_estimate) > 2, name

        asked = []

        def probe(kernel, named_args, kwargs, cfg):
            assert kernel is getattr(tk, name) and named_args["Q"] is q16
            assert kwargs["BLOCK_D"] == 64 and kwargs["HAS_MASK"] is True
            asked.append(tile(cfg))
            return False if tile(cfg) == by_estimate[0] else (None if tile(cfg) == by_estimate[1] else True)

        monkeypatch.setattr(tk, "_fits_compiled", probe)
        kept = [tile(c) for c in prune(tuned.configs, {"Q": q16}, **kw)]
        assert by_estimate[0] not in kept and by_estimate[1] in kept, name
        assert kept == [t for t in asked if t != by_estimate[0]][:8]
        assert kept[: len(by_estimate) - 1] == by_estimate[1:]

        monkeypatch.setattr(tk, "_fits_compiled", lambda *a: False)
        (only,) = prune(tuned.configs, {"Q": q16}, **kw)
        assert tile(only) == tile(prune.fallback({"Q": q16}, **kw)) == tuple(
            {"_attn_fwd_kernel": tk._fixed_fwd, "_attn_bwd_dkv_kernel": tk._fixed_dkv,
             "_attn_bwd_dq_kernel": tk._fixed_dq}[name](64, 64, 2)), name


def test_compile_probe_answers_none_off_the_gpu(tk):
    """Without a CUDA tensor (CPU, the interpreter) the probe cannot compile for a device and
    leaves the choice to the estimates."""
    cfg = tk._attn_fwd_tuned.configs[0]
    q = torch.empty(1, dtype=F16)
    assert tk._fits_compiled(tk._attn_fwd_kernel, {"Q": q}, {"BLOCK_D": 16, "BLOCK_DV": 16}, cfg) is None


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_argument_errors_name_the_argument(tk, device):
    q, k, v = _qkv(1, 2, 8, 9, 16, 16, F32, device)
    full = torch.zeros(1, 2, 8, 9, device=device)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        tk.attention_fwd(q.tolist(), k, v, None, False, 1.0)
    with pytest.raises(ValueError, match=r"k must be 4-D"):
        tk.attention_fwd(q, k[0], v, None, False, 1.0)
    with pytest.raises(TypeError, match="q must have dtype"):
        tk.attention_fwd(q.double(), k.double(), v.double(), None, False, 1.0)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        tk.attention_fwd(q, k, v.half(), None, False, 1.0)
    with pytest.raises(ValueError, match=r"k must be \[B, Hkv, Nk, D\]"):
        tk.attention_fwd(q, k[..., :8], v, None, False, 1.0)
    with pytest.raises(ValueError, match=r"v must be \[B, Hkv, Nk, Dv\]"):
        tk.attention_fwd(q, k, v[:, :, :4], None, False, 1.0)
    with pytest.raises(ValueError, match="head dim of q and k must be in 1..256"):
        big = torch.zeros(1, 1, 4, 257, device=device)
        tk.attention_fwd(big, big, big[..., :16], None, False, 1.0)
    with pytest.raises(TypeError, match="mask must be an additive float mask"):
        tk.attention_fwd(q, k, v, full.bool(), False, 1.0)
    with pytest.raises(ValueError, match=r"mask must be broadcast \(expand\)"):
        tk.attention_fwd(q, k, v, full[:, :1], False, 1.0)
    with pytest.raises(ValueError, match="either mask or is_causal"):
        tk.attention_fwd(q, k, v, full, True, 1.0)
    o, stats = tk.attention_fwd(q, k, v, None, False, 1.0)
    with pytest.raises(ValueError, match="do must be a torch.float32 tensor of shape"):
        tk.attention_bwd(o[:, :1], q, k, v, o, stats, None, False, 1.0, False)
    with pytest.raises(ValueError, match="stats must be a torch.float32 tensor"):
        tk.attention_bwd(o, q, k, v, o, stats.half(), None, False, 1.0, False)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="k must be on q's device"):
            tk.attention_fwd(q, k.to("meta"), v, None, False, 1.0)


# ------------------------------------------------------------------------------------------
# finite fills, grouped-query attention, the lower-right causal diagonal
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -1e9], ids=["finfo_min", "-1e9"])
def test_finite_fill_rows(tk, device, fill):
    """Every key of some rows (and the last keys of all rows) filled with a huge finite value:
    the kernels never scale the fill by log2(e) (finfo.min would become -inf) and keep the row
    maximum apart from the log-sum (which the fill would absorb), so those rows are uniform
    forward and their gradients are the float64 reference's autograd."""
    B, H, Nq, Nk, D = 1, 2, 40, 45, 16
    q, k, v = _qkv(B, H, Nq, Nk, D, D, F32, device, seed=50)
    do = torch.randn(B, H, Nq, D, generator=_gen(51)).to(device)
    add = torch.zeros(1, 1, Nq, Nk, device=device)
    add[..., 35:] = fill
    add[..., [0, 4, 33], :] = fill  # rows in the first and last query tiles
    got = _run(tk, q, k, v, add, False, 0.25, do, need_dmask=True)
    for name, t in got.items():
        assert torch.isfinite(t).all(), name
    assert_close(got["o"][:, :, 4], v.double().mean(dim=2), dtype=F32, name="filled row = mean of v")
    high, low = _reference(q, k, v, add, False, 0.25, do, F32, mask_grad=True)
    _compare(got, high, low, F32, ["o", "dq", "dk", "dv"])
    assert_close(_sum_to(got["dmask"], add.shape), high["dmask"], low["dmask"], dtype=F32, grad=True, name="dmask")


@pytest.mark.parametrize("dtype,causal", [(F32, False), (F16, True), (BF16, False)], ids=["fp32", "fp16-causal", "bf16"])
def test_grouped_query_attention(tk, device, dtype, causal):
    """k and v with fewer heads (H = 6 query heads, 2 kv heads): query head h reads kv head
    h // 3; dk and dv are the sums over each group (against the reference on repeated k, v)."""
    B, H, Hkv, Nq, Nk, D = 2, 6, 2, 33, 40, 16
    g = _gen(52)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype).to(device)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype).to(device)
    do = torch.randn(B, H, Nq, D, generator=g).to(dtype).to(device)
    got = _run(tk, q, k, v, None, causal, 0.25, do)
    assert got["dk"].shape == k.shape and got["dv"].shape == v.shape
    high, low = _reference(q, k, v, None, causal, 0.25, do, dtype, gqa=True)
    _compare(got, high, low, dtype, ["o", "lse", "dq", "dk", "dv"])


@pytest.mark.parametrize("Nq,Nk", [(17, 50), (50, 17), (33, 33), (1, 40)], ids=["wide", "tall", "square", "one-query"])
def test_causal_lower_right(tk, device, Nq, Nk):
    """The diagonal aligned to the last key (key j kept for query i iff j <= i + Nk - Nq), with
    the blocks above it skipped: against the reference with the explicit mask; rows that see no
    key (Nq > Nk) give zeros and no gradient."""
    B, H, D = 1, 2, 16
    q, k, v = _qkv(B, H, Nq, Nk, D, D, F32, device, seed=53)
    do = torch.randn(B, H, Nq, D, generator=_gen(54)).to(device)
    o, stats = tk.attention_fwd(q, k, v, None, True, 0.25, causal_lower_right=True)
    dq, dk, dv, _ = tk.attention_bwd(do, q, k, v, o, stats, None, True, 0.25, False, causal_lower_right=True)
    got = dict(o=o, lse=tk.lse_of(stats), dq=dq, dk=dk, dv=dv)
    keep = ref.causal_mask(Nq, Nk, device, lower_right=True)
    high, low = _reference(q, k, v, keep, False, 0.25, do, F32)
    seen = keep.any(-1)
    _compare({n: t for n, t in got.items() if n != "lse"}, high, low, F32, ["o", "dq", "dk", "dv"])
    assert_close(got["lse"][..., seen], high["lse"][..., seen], low["lse"][..., seen], dtype=F32, name="lse")
    assert (got["o"][..., ~seen, :] == 0).all() and (got["dq"][..., ~seen, :] == 0).all()


@pytest.mark.skipif(not INTERPRET, reason="concerns Triton's interpreter only")
def test_interpreter_rounds_bf16_casts_to_nearest_even():
    """The test harness (tests/_triton_interpreter.py, imported by the root conftest) makes the
    interpreter's float32 -> bfloat16 casts round to nearest even, as compiled Triton and torch do."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(X, Y, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(Y + o, tl.load(X + o).to(tl.bfloat16))

    x = torch.randn(1024, generator=_gen(55))
    x[:4] = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, float("inf"), float("nan")])  # ties, inf, nan
    y = torch.empty(1024, dtype=BF16)
    cast[(1,)](x, y, N=1024)
    want = x.to(BF16)
    assert torch.equal(y[:3], want[:3]) and torch.isnan(y[3]) and torch.equal(y[4:], want[4:])
