"""Attention maps in O(N) memory (attnkern.explain.attention) against the reference that
materialises P (attnkern.reference.attention_maps).

Both non-reference backends are checked on every case: ``cpu`` (the blockwise PyTorch path,
with a small block so that several query and key tiles and ragged edges are exercised) and
``triton`` (under the interpreter on CPU tensors, on the GPU when there is one). Outputs are
float32 maps computed in float32 from the inputs: they are compared with the reference computed
from the same inputs upcast to float64 (the exact target), allowing twice the error of the
reference computed from the inputs upcast to float32 (``tests.tolerance.assert_close`` with
dtype=float32). Then: strided views, fully masked rows, the forms of ``rows``, determinism,
errors, and peak memory at N = 16384 measured in a subprocess.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attnkern.explain import attention as A
from attnkern.reference import attention_maps as R
from tests.tolerance import assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["cpu", "triton"]
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _device(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if INTERPRET:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("ATTNKERN_BACKEND", request.param)
    return request.param


def make_qk(B, H, n_q, n_k, D, dtype, device="cpu", seed=0, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    # spread > 1 sharpens the softmax, so the maps are not nearly uniform
    q = (spread * torch.randn(B, H, n_q, D, generator=g)).to(device=device, dtype=dtype)
    k = (spread * torch.randn(B, H, n_k, D, generator=g)).to(device=device, dtype=dtype)
    return q, k


def make_mask(kind, B, H, n_q, n_k, dtype, device="cpu", seed=1):
    """(attn_mask, is_causal) of a kind; every masked kind hides every key of query row
    min(3, n_q - 1) when n_q > 1 (a fully masked row)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "bool":  # [B, 1, N_q, N_k]: broadcast over heads
        m = torch.rand(B, 1, n_q, n_k, generator=g) > 0.3
        if n_q > 1:
            m[:, :, min(3, n_q - 1)] = False
        return m.to(device), False
    if kind == "additive":  # [N_q, N_k] float32, some -inf
        m = torch.randn(n_q, n_k, generator=g)
        m = m.masked_fill(torch.rand(n_q, n_k, generator=g) > 0.8, float("-inf"))
        if n_q > 1:
            m[min(3, n_q - 1)] = float("-inf")
        return m.to(device), False
    if kind == "additive_qdtype":  # [H, 1, N_k] in q's dtype, finite
        return (2 * torch.randn(H, 1, n_k, generator=g)).to(device=device, dtype=dtype), False
    if kind == "keypad":  # [B, 1, 1, N_k] bool: bags of different sizes, padding keys hidden
        keep = torch.ones(B, 1, 1, n_k, dtype=torch.bool)
        for b in range(B):
            keep[b, ..., max(1, n_k - 5 * b):] = False
        return keep.to(device), False
    raise ValueError(kind)


def references(fn, q, k, attn_mask, is_causal, scale=None, **kw):
    """(exact, float32) references: fn on q, k upcast to float64 and to float32 (float64
    input: the float64 reference alone)."""
    exact = fn(q.double(), k.double(), attn_mask=attn_mask, scale=scale, is_causal=is_causal, **kw)
    if q.dtype == F64:
        return exact, None
    return exact, fn(q.float(), k.float(), attn_mask=attn_mask, scale=scale, is_causal=is_causal, **kw)


def check(actual, fn, q, k, attn_mask, is_causal, scale=None, name="map", **kw):
    exact, ref32 = references(fn, q, k, attn_mask, is_causal, scale, **kw)
    want = F64 if q.dtype == F64 else F32
    assert actual.dtype == want, f"{name}: dtype {actual.dtype}, expected {want}"
    assert_close(actual.cpu(), exact, None if ref32 is None else ref32, dtype=want, name=name)


# (B, H, N_q, N_k, D, dtype, mask kind): B 1/2, H 1/3, N in {1, 17, 130}, N_q != N_k,
# D in {16, 40, 64}, every dtype and mask kind, causal with N_q < N_k and N_q > N_k.
CASES = [
    (1, 1, 1, 1, 16, F32, "none"),
    (2, 3, 17, 130, 40, F32, "none"),
    (1, 3, 130, 17, 64, F32, "causal"),
    (2, 1, 130, 130, 16, F32, "bool"),
    (1, 3, 17, 17, 40, F32, "additive"),
    (2, 3, 130, 17, 16, F32, "keypad"),
    (1, 3, 1, 17, 40, F32, "bool"),
    (2, 1, 17, 130, 64, BF16, "none"),
    (1, 3, 130, 130, 40, BF16, "causal"),
    (2, 3, 17, 17, 16, BF16, "keypad"),
    (1, 1, 130, 1, 64, BF16, "additive_qdtype"),
    (1, 1, 130, 17, 64, F16, "bool"),
    (2, 3, 17, 130, 40, F16, "additive"),
    (1, 1, 17, 130, 16, F16, "causal"),
]


def case_id(c):
    B, H, n_q, n_k, D, dt, kind = c
    return f"{B}x{H}x{n_q}x{n_k}x{D}-{str(dt)[6:]}-{kind}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_received_matches_reference(case, backend):
    B, H, n_q, n_k, D, dt, kind = case
    dev = _device(backend)
    q, k = make_qk(B, H, n_q, n_k, D, dt, dev)
    mask, causal = make_mask(kind, B, H, n_q, n_k, dt, dev)
    out = A.attention_received(q, k, mask, is_causal=causal, block=8)
    assert out.shape == (B, H, n_k) and out.device == dev
    check(out, R.attention_received, q.cpu(), k.cpu(), None if mask is None else mask.cpu(), causal,
          name=f"received[{backend}]")


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_rows_matches_reference(case, backend):
    B, H, n_q, n_k, D, dt, kind = case
    dev = _device(backend)
    q, k = make_qk(B, H, n_q, n_k, D, dt, dev)
    mask, causal = make_mask(kind, B, H, n_q, n_k, dt, dev)
    rows = sorted({0, n_q // 2, n_q - 1, min(3, n_q - 1)})
    out = A.attention_rows(q, k, rows, mask, is_causal=causal)
    assert out.shape == (B, H, len(rows), n_k)
    check(out, R.attention_rows, q.cpu(), k.cpu(), None if mask is None else mask.cpu(), causal,
          name=f"rows[{backend}]", rows=rows)


def test_received_float64_and_scale(monkeypatch):
    monkeypatch.setenv("ATTNKERN_BACKEND", "cpu")
    q, k = make_qk(2, 3, 17, 130, 40, F64)
    mask, _ = make_mask("bool", 2, 3, 17, 130, F64)
    for blk in (1, 5, 1024):
        out = A.attention_received(q, k, mask, scale=0.3, block=blk)
        check(out, R.attention_received, q, k, mask, False, scale=0.3, name=f"received f64 block={blk}")
    out = A.attention_rows(q, k, [0, 3], mask, scale=0.3)
    check(out, R.attention_rows, q, k, mask, False, scale=0.3, rows=[0, 3], name="rows f64")


def test_scale_triton(monkeypatch):
    monkeypatch.setenv("ATTNKERN_BACKEND", "triton")
    dev = _device("triton")
    q, k = make_qk(1, 3, 17, 130, 40, F32, dev)
    out = A.attention_received(q, k, scale=0.05)
    check(out, R.attention_received, q.cpu(), k.cpu(), None, False, scale=0.05, name="received scale")


def test_triton_small_tiles_and_lse():
    """Forced small tiles (square and not): many query and key blocks, causal block skipping
    on both sides;
    and pass 1 alone (row_lse) against the reference lse, -inf rows included."""
    dev = _device("triton")
    from attnkern.functional import broadcast_mask
    from attnkern.reference.attention import attention_probs
    from attnkern.triton import attention_maps as tm

    q, k = make_qk(1, 3, 70, 45, 40, F32, dev)
    for kind, bm, bn in (("causal", 16, 16), ("causal", 32, 16), ("causal", 16, 32), ("bool", 16, 16)):
        mask, causal = make_mask(kind, 1, 3, 70, 45, F32, dev)
        m4 = None if mask is None else broadcast_mask(mask, q, k)
        out = tm.received(q, k, m4, causal, block_m=bm, block_n=bn)
        check(out, R.attention_received, q.cpu(), k.cpu(), None if mask is None else mask.cpu(),
              causal, name=f"received {bm}x{bn} {kind}")
        lse = tm.row_lse(q, k, m4, causal, block_m=bm, block_n=bn).cpu()
        _, ref = attention_probs(q.cpu().double(), k.cpu().double(),
                                 None if mask is None else mask.cpu(), causal)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
        assert_close(lse.masked_fill(torch.isinf(lse), 0), ref.masked_fill(torch.isinf(ref), 0),
                     dtype=F32, name=f"lse {kind}")
    with pytest.raises(ValueError, match="block_m"):
        tm.received(q, k, block_m=24)


@pytest.mark.parametrize("dt", [F32, BF16])
def test_strided_views_from_packed_qkv(dt, backend):
    """q, k cut from a packed [B, N, 3, H, D] projection (no copy), and a q whose head dim is
    not the innermost stride."""
    dev = _device(backend)
    B, N, H, D = 2, 33, 3, 40
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(device=dev, dtype=dt)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and q.data_ptr() == qkv.data_ptr()
    for causal in (False, True):
        out = A.attention_received(q, k, is_causal=causal, block=16)
        check(out, R.attention_received, q.cpu(), k.cpu(), None, causal, name="received packed")
        rows = A.attention_rows(q, k, -1, is_causal=causal)
        check(rows, R.attention_rows, q.cpu(), k.cpu(), None, causal, rows=[-1], name="rows packed")
    qt = torch.randn(B, H, D, 20, generator=g).to(device=dev, dtype=dt).transpose(-2, -1)
    out = A.attention_received(qt, k, block=16)
    check(out, R.attention_received, qt.cpu(), k.cpu(), None, False, name="received q^T view")


def test_fully_masked_rows(backend):
    """A fully masked query row is a zero row of P: rows() gives zeros, received() adds 0 for it
    and still divides by N_q; a bag whose every key is padding gives an all-zero map."""
    dev = _device(backend)
    B, H, n_q, n_k = 2, 1, 9, 12
    q, k = make_qk(B, H, n_q, n_k, 16, F32, dev)
    mask = torch.ones(B, 1, n_q, n_k, dtype=torch.bool, device=dev)
    mask[0, :, 4] = False        # one row of batch 0 sees nothing
    mask[1] = False              # batch 1 sees nothing at all
    r = A.attention_rows(q, k, [4, 5], mask)
    assert torch.equal(r[0, :, 0], torch.zeros_like(r[0, :, 0]))
    assert torch.allclose(r[0, :, 1].sum(-1), torch.ones(H, device=dev))
    assert torch.equal(r[1], torch.zeros_like(r[1]))
    out = A.attention_received(q, k, mask, block=4)
    assert not torch.isnan(out).any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # 8 of the 9 rows of batch 0 are distributions: the map sums to 8/9, not 1
    torch.testing.assert_close(out[0].sum(-1).cpu(), torch.full((H,), 8 / 9), atol=1e-6, rtol=0)
    check(out, R.attention_received, q.cpu(), k.cpu(), mask.cpu(), False, name="received masked")


def test_rows_forms(backend):
    dev = _device(backend)
    q, k = make_qk(1, 3, 17, 20, 16, F32, dev)
    full = R.attention_rows(q.cpu().double(), k.cpu().double(), list(range(17)))
    forms = {
        "int": (0, [0]), "neg int": (-1, [16]), "list": ([2, 0, 2], [2, 0, 2]),
        "tuple": ((5, -3), [5, 14]), "tensor": (torch.tensor([1, 16]), [1, 16]),
        "int32 tensor": (torch.tensor([-17], dtype=torch.int32), [0]),
        "0-d tensor": (torch.tensor(7), [7]), "device tensor": (torch.tensor([3], device=dev), [3]),
    }
    for name, (rows, want) in forms.items():
        out = A.attention_rows(q, k, rows)
        assert out.shape == (1, 3, len(want), 20), name
        assert_close(out.cpu(), full[:, :, want], dtype=F32, name=f"rows {name}")


def test_inputs_that_require_grad(backend):
    """q and k straight from a model's forward pass: the maps are computed without a graph."""
    dev = _device(backend)
    q, k = make_qk(1, 2, 20, 20, 16, F32, dev)
    q.requires_grad_(True)
    k.requires_grad_(True)
    for out in (A.attention_received(q, k, block=8), A.attention_rows(q, k, 0)):
        assert not out.requires_grad
    check(A.attention_received(q, k, block=8), R.attention_received, q.detach().cpu(),
          k.detach().cpu(), None, False)


def test_deterministic(backend):
    dev = _device(backend)
    q, k = make_qk(2, 3, 130, 77, 40, BF16, dev)
    mask, _ = make_mask("bool", 2, 3, 130, 77, BF16, dev)
    a = A.attention_received(q, k, mask, block=32)
    b = A.attention_received(q, k, mask, block=32)
    assert torch.equal(a, b)
    c = A.attention_received(q, k, is_causal=True, block=32)
    d = A.attention_received(q, k, is_causal=True, block=32)
    assert torch.equal(c, d)


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("ATTNKERN_BACKEND", "reference")
    q, k = make_qk(1, 3, 17, 20, 16, BF16)
    out = A.attention_received(q, k, is_causal=True)
    check(out, R.attention_received, q, k, None, True, name="received reference")
    out = A.attention_rows(q, k, [1, -2], is_causal=True)
    check(out, R.attention_rows, q, k, None, True, rows=[1, -2], name="rows reference")


def test_cpu_path_needs_no_extension(monkeypatch):
    """CPU tensors run the blockwise PyTorch path even without the C++ extension (it is not
    C++), and with no warning about a fallback."""
    import warnings

    from attnkern import _cpu

    monkeypatch.delenv("ATTNKERN_BACKEND", raising=False)
    monkeypatch.setattr(_cpu, "extension", lambda: None)
    assert A._pick("attention_received", torch.empty(1, 1, 1, 1)) == "cpu"
    called = []
    orig = A._received_blockwise
    monkeypatch.setattr(A, "_received_blockwise", lambda *a: called.append(1) or orig(*a))
    q, k = make_qk(1, 1, 9, 9, 16, F32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = A.attention_received(q, k)
    assert called
    check(out, R.attention_received, q, k, None, False)


@pytest.mark.parametrize("D,dt", [(1, F32), (100, BF16), (256, F16)])
def test_head_dims(D, dt, backend):
    """Head dims padded to a power of two inside the kernels (1 -> 16, 100 -> 128) and the
    largest, 256 (smaller query tiles)."""
    dev = _device(backend)
    q, k = make_qk(1, 2, 40, 33, D, dt, dev, spread=1.0)
    out = A.attention_received(q, k, is_causal=True, block=16)
    check(out, R.attention_received, q.cpu(), k.cpu(), None, True, name=f"received D={D}")


def test_triton_refuses_what_it_cannot_take(monkeypatch):
    _device("triton")
    monkeypatch.setenv("ATTNKERN_BACKEND", "triton")
    q, k = make_qk(1, 1, 4, 4, 16, F64)
    with pytest.raises(RuntimeError, match="float64"):
        A.attention_received(q, k)
    q, k = make_qk(1, 1, 4, 4, 257, F32)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        A.attention_received(q, k)


def test_bad_inputs():
    q, k = make_qk(1, 2, 5, 6, 16, F32)
    with pytest.raises(IndexError, match="rows index 5 .*N_q = 5"):
        A.attention_rows(q, k, 5)
    with pytest.raises(IndexError, match="rows index -6"):
        A.attention_rows(q, k, [0, -6])
    with pytest.raises(TypeError, match="rows must be an integer tensor"):
        A.attention_rows(q, k, torch.tensor([0.0]))
    with pytest.raises(TypeError, match="rows must be an integer tensor"):
        A.attention_rows(q, k, torch.tensor([True]))
    with pytest.raises(ValueError, match="rows must be .*shape \\(1, 2\\)"):
        A.attention_rows(q, k, torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="rows must hold ints"):
        A.attention_rows(q, k, [0, 1.5])
    with pytest.raises(TypeError, match="rows must be an int"):
        A.attention_rows(q, k, "cls")
    with pytest.raises(TypeError, match="rows must be an int"):
        A.attention_rows(q, k, True)
    with pytest.raises(ValueError, match="at least one query row"):
        A.attention_rows(q, k, [])
    mask = torch.ones(5, 6, dtype=torch.bool)
    for fn, args in ((A.attention_received, ()), (A.attention_rows, (0,))):
        with pytest.raises(RuntimeError, match="not both"):
            fn(q, k, *args, mask, is_causal=True)
        with pytest.raises(RuntimeError, match="attn_mask of shape \\(4, 6\\)"):
            fn(q, k, *args, torch.ones(4, 6, dtype=torch.bool))
        with pytest.raises(RuntimeError, match="attn_mask must be bool"):
            fn(q, k, *args, torch.ones(5, 6, dtype=torch.int64))
        with pytest.raises(RuntimeError, match="at least 2 dimensions"):
            fn(q[0, 0, 0], k, *args)
        with pytest.raises(RuntimeError, match="one dtype"):
            fn(q, k.half(), *args)
        with pytest.raises(RuntimeError, match="head dim"):
            fn(q, k[..., :8], *args)
        with pytest.raises(ValueError, match="at least one token"):
            fn(q[:, :, :0], k, *args) if fn is A.attention_received else fn(q, k[:, :, :0], *args)
        with pytest.raises(TypeError, match="scale"):
            fn(q, k, *args, scale="0.1")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="block must be a positive int"):
            A.attention_received(q, k, block=bad)


def test_received_several_blocks_default_block():
    """The default block over more than one tile (N = 1500 > 1024, ragged) equals the reference."""
    q, k = make_qk(1, 1, 1500, 1100, 32, F32, spread=1.0)
    for causal in (False, True):
        out = A.attention_received(q, k, is_causal=causal)
        check(out, R.attention_received, q, k, None, causal, name=f"received N=1500 causal={causal}")


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, time
    import torch
    from attnkern.explain.attention import attention_received

    def peak_mib():
        # The peak resident memory of this process's address space (VmHWM, which clear_refs
        # resets). Not ru_maxrss: Linux carries that over fork and exec from the parent, so a
        # child of a big pytest process would report the parent's peak.
        with open("/proc/self/status") as f:
            for l in f:
                if l.startswith("VmHWM:"):
                    return int(l.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def current_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

    def baseline_mib():
        # Reset the peak to the current RSS (Linux >= 4.0), so the growth measured is that of
        # the call and not hidden under an earlier, higher peak (importing torch). Without it,
        # count from the current RSS: an over-estimate, never an under-estimate.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return current_mib()

    N, D = int(sys.argv[1]), 32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, N, D, generator=g)
    k = torch.randn(1, 1, N, D, generator=g)
    attention_received(q[:, :, :300], k[:, :, :300], block=128)  # warm up torch and BLAS
    before = baseline_mib()
    t0 = time.perf_counter()
    out = attention_received(q, k)
    seconds = time.perf_counter() - t0
    growth = peak_mib() - before
    # the probe sees big allocations: touch a 512 MiB tensor and watch the peak move
    before = baseline_mib()
    big = torch.ones(128 * 1024 * 1024)
    probe = peak_mib() - before
    del big
    total = out.sum().item()
    print(f"RESULT growth_mib={growth:.1f} probe_mib={probe:.1f} seconds={seconds:.2f} total={total:.6f}")
""")


def test_received_memory_is_linear():
    """attention_received at N = 16384 (an N x N float32 matrix is 1 GiB) on CPU: the peak
    resident memory of a fresh process grows by far less than that (measured with
    getrusage's ru_maxrss after warming up, the peak reset to the current RSS first; a 512 MiB
    allocation checks that the probe sees big allocations). The values equal the reference's
    (test_received_several_blocks_default_block, N = 1500 with the same default block)."""
    N = 16384
    env = dict(os.environ, ATTNKERN_BACKEND="cpu", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(N)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1]
    vals = dict(kv.split("=") for kv in line.split()[1:])
    growth, probe, total = float(vals["growth_mib"]), float(vals["probe_mib"]), float(vals["total"])
    print(line)
    assert probe > 400, f"the peak-memory probe does not see a 512 MiB allocation ({line})"
    assert growth < 256, f"attention_received at N={N} grew the peak RSS by {growth:.0f} MiB ({line})"
    # each of the N rows is a distribution (no mask): the map sums to 1
    assert abs(total - 1.0) < 1e-3, line


# ------------------------------------------------------------------------------------------
# huge finite additive masks, any rank, CausalBias
# ------------------------------------------------------------------------------------------

def _filled(fill, n_q, n_k, dtype=F32, full_rows=(4,), pad_from=9, lead=(1, 2)):
    m = torch.zeros(*lead, n_q, n_k, dtype=dtype)
    m[..., pad_from:] = fill
    for r in full_rows:
        m[..., r, :] = fill
    return m


def _probs64(q, k, mask, score_dtype):
    """The float64 softmax of the scores q k^T / sqrt(D) + mask as a kernel that accumulates in
    ``score_dtype`` forms them (the fill absorbs q.k where that dtype's ulp exceeds it)."""
    d = torch.float64
    s = (q.to(d) @ k.to(d).transpose(-2, -1)) / q.shape[-1] ** 0.5 + mask.to(d)
    return torch.softmax(s.to(score_dtype).to(d), dim=-1)


@pytest.mark.parametrize("fill", ["finfo_min", "-1e9"])
def test_finite_fill_issue_case(fill, backend):
    """The issue's case: q [1, 2, 5, 16], k [1, 2, 12, 16], the fill on keys 9..11 of every row
    and on every key of row 4. Row 4 is uniform (1/12 per key, sums to 1, not 12), and the
    received map is the mean of the float64 softmax of the float32 scores."""
    dev = _device(backend)
    q, k = make_qk(1, 2, 5, 12, 16, F32, seed=40, spread=1.0)
    value = torch.finfo(F32).min if fill == "finfo_min" else -1e9
    mask = _filled(value, 5, 12)
    p64 = _probs64(q, k, mask, F32)
    rows = A.attention_rows(q.to(dev), k.to(dev), [3, 4], attn_mask=mask.to(dev)).cpu()
    assert_close(rows[:, :, 1], torch.full((1, 2, 12), 1 / 12, dtype=torch.float64), dtype=F32, name="row 4")
    assert_close(rows, p64[:, :, [3, 4]], dtype=F32, name="rows")
    for block in (4, 1024):
        rec = A.attention_received(q.to(dev), k.to(dev), attn_mask=mask.to(dev), block=block).cpu()
        assert_close(rec, p64.mean(dim=-2), dtype=F32, name=f"received block={block}")
    check(rec, R.attention_received, q, k, mask, False, name="received vs reference")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_finite_fill_of_the_input_dtype(dtype, backend):
    """Masks in q's half dtype filled with its finfo.min, fully and partly masked rows, over
    several tiles (block 16); the tolerance rule against the float64 / float32 references."""
    dev = _device(backend)
    q, k = make_qk(2, 3, 40, 33, 16, dtype, seed=41)
    mask = _filled(torch.finfo(dtype).min, 40, 33, dtype, full_rows=(0, 20, 39), pad_from=25, lead=(2, 1))
    rec = A.attention_received(q.to(dev), k.to(dev), attn_mask=mask.to(dev), block=16)
    check(rec, R.attention_received, q, k, mask, False, name="received")
    rows = A.attention_rows(q.to(dev), k.to(dev), [0, 5, 20], attn_mask=mask.to(dev))
    check(rows, R.attention_rows, q, k, mask, False, rows=torch.tensor([0, 5, 20]), name="rows")


@pytest.mark.parametrize("shapes", [((3, 7, 16), (3, 9, 16)), ((2, 2, 3, 7, 16), (1, 2, 3, 9, 16)),
                                    ((7, 16), (9, 16))], ids=["3d", "5d-broadcast", "2d"])
def test_any_rank(shapes, backend):
    """Inputs of rank 2, 3 and 5 with broadcast batch dims: the maps have the broadcast batch
    shape and equal the reference computed on the inputs expanded to 4-D."""
    dev = _device(backend)
    g = torch.Generator().manual_seed(42)
    q, k = (torch.randn(s, generator=g) for s in shapes)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    q4 = q.expand(*batch, *q.shape[-2:]).reshape(-1, 1, *q.shape[-2:]) if len(batch) else q[None, None]
    k4 = k.expand(*batch, *k.shape[-2:]).reshape(-1, 1, *k.shape[-2:]) if len(batch) else k[None, None]
    rec = A.attention_received(q.to(dev), k.to(dev), block=4)
    assert rec.shape == batch + (k.shape[-2],)
    check(rec.reshape(-1, 1, k.shape[-2]), R.attention_received, q4, k4, None, False, name="received")
    rows = A.attention_rows(q.to(dev), k.to(dev), [0, -1])
    assert rows.shape == batch + (2, k.shape[-2])
    check(rows.reshape(-1, 1, 2, k.shape[-2]), R.attention_rows, q4, k4, None, False,
          rows=torch.tensor([0, -1]), name="rows")


@pytest.mark.parametrize("variant,n_q,n_k", [("upper_left", 40, 33), ("lower_right", 17, 40),
                                             ("lower_right", 40, 17)], ids=["ul", "lr-wide", "lr-tall"])
def test_causal_bias(variant, n_q, n_k, backend):
    """A CausalBias as attn_mask: the maps equal the reference with the explicit boolean mask
    (rows that see no key are zeros), several tiles and ragged edges (block 16)."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    from attnkern.reference.attention import causal_mask

    dev = _device(backend)
    q, k = make_qk(2, 2, n_q, n_k, 16, F32, seed=43)
    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(n_q, n_k)
    keep = causal_mask(n_q, n_k, lower_right=variant == "lower_right")
    rec = A.attention_received(q.to(dev), k.to(dev), attn_mask=bias, block=16)
    check(rec, R.attention_received, q, k, keep, False, name="received")
    rows = A.attention_rows(q.to(dev), k.to(dev), [0, n_q - 1], attn_mask=bias)
    check(rows, R.attention_rows, q, k, keep, False, rows=torch.tensor([0, n_q - 1]), name="rows")
