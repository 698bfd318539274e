"""The Triton gating kernels against the reference, primitive by primitive.

Without a GPU they run under Triton's interpreter on CPU tensors: the root conftest sets
``TRITON_INTERPRET=1`` before triton is first imported. The case matrix is the one every backend
is checked on; the tests after it aim at what is specific to these kernels: the tiling paths
(pixel ranges split across programs and combined, channel blocks, the two ways of reducing both
axes in one pass), ties in all dtypes, float64, NaN/inf, strides of size-1 dimensions,
determinism of every reduction and the argument errors.
"""
import math
import os

import pytest
import torch

from attnkern.reference import gating as ref
from tests.cases import all_cases, make_input
from tests.primitives import check_deterministic, check_primitives, check_rejects_non_dense
from tests.tolerance import assert_close

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(scope="module")
def tk():
    from attnkern.triton import gating

    return gating


@pytest.fixture(scope="module")
def device():
    """Where the tests of this file that build their own inputs put them: CPU tensors under the
    interpreter, the GPU otherwise."""
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.fail("the triton kernels need a GPU or TRITON_INTERPRET=1")
    return torch.device("cuda")


# ------------------------------------------------------------------------------------------
# the case matrix
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,layout,dtype", all_cases())
def test_primitives_match_reference(tk, device, shape, layout, dtype):
    if layout == "sliced":
        layout = "contiguous"  # the ops layer hands backends a dense copy of a sliced view
    check_primitives(tk, shape, layout, dtype, device=device)


@pytest.mark.parametrize("shape,layout", [
    ((2, 72, 7, 9), "channels_last"),
    ((3, 5, 9, 7), "contiguous"),
    ((1, 24, 1, 1), "contiguous"),
], ids=["2x72x7x9-channels_last", "3x5x9x7-contiguous", "1x24x1x1-contiguous"])
def test_float64_accumulates_in_float64(tk, device, shape, layout):
    assert torch.float64 in tk.SUPPORTED_DTYPES
    check_primitives(tk, shape, layout, torch.float64, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ties_count_like_amax(tk, device, layout, dtype):
    check_primitives(tk, (2, 24, 9, 11), layout, dtype, ties=True, device=device)


# ------------------------------------------------------------------------------------------
# tiling paths
# ------------------------------------------------------------------------------------------

def _layout(tk, shape, layout, device):
    """The [B, C, HW] view the kernels plan their tiles from."""
    return tk._check_x(make_input(shape, layout, torch.float32).to(device), "test")


# (shape, layout, what the shape exercises); each is asserted below, so a change of the tiling
# constants that stops a shape from covering its path fails here instead of silently testing less.
TILING_CASES = [
    ((1, 3, 48, 100), "contiguous", "split"),        # pixel ranges over programs, merged after
    ((1, 3, 48, 100), "channels_last", "split"),
    ((2, 200, 5, 7), "channels_last", "channel_blocks"),  # channel sums combined per block
    ((1, 600, 3, 3), "contiguous", "channel_blocks"),
    ((1, 3, 48, 100), "contiguous", "loop_c"),       # both-axis pass looping over C, many pixel blocks
]


def _id(case):
    shape, layout, path = case
    return f"{path}-{'x'.join(map(str, shape))}-{layout}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape,layout,path", TILING_CASES, ids=[_id(c) for c in TILING_CASES])
def test_tiling_paths(tk, device, shape, layout, path, dtype):
    L = _layout(tk, shape, layout, device)
    plan = tk._split_plan(L)
    if path == "split":
        assert plan.nsplit > 1
    elif path == "channel_blocks":
        assert plan.ncb > 1 and plan.block_c >= tk._MIN_BLOCK_C_FOR_HW_LOOP
    else:
        assert plan.block_c < tk._MIN_BLOCK_C_FOR_HW_LOOP
        assert math.ceil(L.HW / tk._c_loop_tile(L)[1]) > 1
    check_primitives(tk, shape, layout, dtype, device=device)


def test_need_flags_of_gate_apply_backward(tk, device):
    """Each gate gradient alone (SE needs dgc only), in both reduction forms."""
    for shape, layout in (((1, 3, 48, 100), "contiguous"), ((2, 200, 5, 7), "channels_last")):
        x = make_input(shape, layout, torch.float32).to(device)
        dout = make_input(shape, layout, torch.float32, seed=1).to(device)
        B, C, H, W = shape
        gc = torch.rand(B, C, device=device)
        gs = torch.rand(B, H * W, device=device)
        exp = ref.gate_apply_backward(dout, x, gc, gs, True, True)
        dgc, dgs = tk.gate_apply_backward(dout, x, gc, gs, True, False)
        assert dgs.numel() == 0
        assert_close(dgc, exp[0], dtype=torch.float32, name="dgc alone")
        dgc, dgs = tk.gate_apply_backward(dout, x, gc, gs, False, True)
        assert dgc.numel() == 0
        assert_close(dgs, exp[1], dtype=torch.float32, name="dgs alone")
        assert all(t.numel() == 0 for t in tk.gate_apply_backward(dout, x, gc, gs, False, False))


# ------------------------------------------------------------------------------------------
# strides, NaN and inf
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,strides", [
    ((2, 3, 5, 1), (15, 5, 1, 7)),       # W == 1: W's stride is arbitrary, H's is the pixel stride
    ((2, 3, 1, 5), (15, 5, 99, 1)),      # H == 1
    ((2, 1, 4, 5), (20, 3, 5, 1)),       # C == 1
    ((1, 6, 4, 5), (7, 1, 30, 6)),       # B == 1, channels_last
], ids=["W1", "H1", "C1", "B1-channels_last"])
def test_strides_of_size_one_dims_are_ignored(tk, device, shape, strides):
    n = max(sum((s - 1) * st for s, st in zip(shape, strides)) + 1, 1)
    storage = torch.randn(n + 128, generator=torch.Generator().manual_seed(0)).to(device)
    x = storage.as_strided(shape, strides)
    assert x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    B, C, H, W = shape
    gc = torch.rand(B, C, device=device)
    gs = torch.rand(B, H * W, device=device)
    for got, exp in zip(tk.channel_stats(x), ref.channel_stats(x)):
        assert_close(got.double(), exp.double(), dtype=torch.float32, name="channel_stats")
    for got, exp in zip(tk.spatial_stats(x, gc), ref.spatial_stats(x, gc)):
        assert_close(got.double(), exp.double(), dtype=torch.float32, name="spatial_stats")
    out = tk.gate_apply(x, gc, gs)
    assert out.stride() == torch.empty_like(x).stride()
    assert_close(out, ref.gate_apply(x, gc, gs), dtype=torch.float32, name="gate_apply")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("shape,layout", [((1, 3, 48, 100), "contiguous"),
                                          ((1, 3, 48, 100), "channels_last"),
                                          ((2, 200, 5, 7), "channels_last")],
                         ids=["split-contiguous", "split-channels_last", "channel_blocks-channels_last"])
def test_nan_and_inf_rows(tk, device, shape, layout):
    """A NaN makes the max of its row NaN, in whichever tile or pixel range it lies; rows of
    -inf and +inf keep exact maxima and counts; nothing reads out of bounds."""
    B, C, H, W = shape
    x = make_input(shape, "contiguous", torch.float32)
    x[0, 0, H - 1, W - 1] = float("nan")  # last pixel range of channel 0
    x[0, 1] = float("-inf")               # a whole row of -inf
    x[0, 2, 0, :3] = float("inf")         # three tied +inf
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    x = x.to(device)
    gc = torch.rand(B, C, device=device) + 0.5
    got, exp = tk.channel_stats(x), ref.channel_stats(x)
    assert_close(got[0], exp[0], dtype=torch.float32, name="cmean")
    assert_close(got[1], exp[1], dtype=torch.float32, name="cmax")
    finite = ~torch.isnan(exp[1])
    assert torch.equal(got[2][finite], exp[2][finite])
    assert int(got[2][0, 1]) == H * W and int(got[2][0, 2]) == 3
    got, exp = tk.spatial_stats(x, gc), ref.spatial_stats(x, gc)
    assert_close(got[1], exp[1], dtype=torch.float32, name="smax")
    assert torch.equal(torch.isnan(got[0]), torch.isnan(exp[0]))
    ok = ~torch.isnan(exp[1])
    assert torch.equal(got[2][ok], exp[2][ok])
    # The backward passes, fed the same statistics as the reference, agree wherever the
    # reference is finite (a NaN row's count of zero makes the reference's mask 0/0 = NaN).
    dout = make_input(shape, layout, torch.float32, seed=1).to(device)
    _, smax, scount = got
    _, cmax, ccount = tk.channel_stats(x)
    d_hw = torch.randn(B, H * W, device=device)
    d_c = torch.randn(B, C, device=device)
    args = (x, dout, gc, None, smax, scount, d_hw, d_hw, cmax, ccount, d_c, d_c)
    dx, dx_ref = tk.gating_input_grad(*args), ref.gating_input_grad(*args)
    fin = torch.isfinite(dx_ref)
    assert fin.float().mean() > 0.5
    assert_close(dx[fin], dx_ref[fin], dtype=torch.float32, name="dx")
    dgc, dgs = tk.gate_apply_backward(dout, x, gc, None, True, True)
    dgc_ref, dgs_ref = ref.gate_apply_backward(dout, x, gc, None, True, True)
    assert torch.equal(torch.isfinite(dgc), torch.isfinite(dgc_ref))
    assert torch.equal(torch.isfinite(dgs), torch.isfinite(dgs_ref))


# ------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------

def test_deterministic(tk, device):
    check_deterministic(tk, device=device)


@pytest.mark.parametrize("shape,layout", [((1, 3, 48, 100), "contiguous"), ((2, 200, 5, 7), "channels_last")],
                         ids=["split-contiguous", "channel_blocks-channels_last"])
def test_every_reduction_bitwise_reproducible(tk, device, shape, layout):
    B, C, H, W = shape
    x = make_input(shape, layout, torch.bfloat16).to(device)
    dout = make_input(shape, layout, torch.bfloat16, seed=1).to(device)
    g = torch.Generator().manual_seed(2)
    gc, gs = torch.rand(B, C, generator=g).to(device), torch.rand(B, H * W, generator=g).to(device)
    d_hw, d_c = torch.randn(B, H * W, generator=g).to(device), torch.randn(B, C, generator=g).to(device)
    _, smax, scount = ref.spatial_stats(x, gc)

    def run():
        return [*tk.channel_stats(x), *tk.spatial_stats(x, gc), *tk.gate_apply_backward(dout, x, gc, gs, True, True),
                *tk.gate_apply_backward(dout, x, None, None, True, True),
                tk.spatial_stats_backward(x, gc, smax, scount, d_hw, d_hw),
                *tk.bam_combine_backward(dout, x, d_c, d_hw, False), *tk.bam_combine_backward(dout, x, d_c, d_hw, True)]

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs between two runs"


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_rejects_bad_arguments(tk, device):
    check_rejects_non_dense(tk, device=device)


def test_argument_errors_name_the_argument(tk, device):
    x = torch.randn(2, 8, 5, 6, device=device)
    gc, gs = torch.rand(2, 8, device=device), torch.rand(2, 30, device=device)
    _, smax, scount = ref.spatial_stats(x, gc)
    with pytest.raises(ValueError, match=r"x must be NCHW-contiguous or channels_last-contiguous"):
        tk.channel_stats(x[:, :, :, 1:])
    with pytest.raises(ValueError, match="x must be 4-D"):
        tk.channel_stats(x[0])
    with pytest.raises(TypeError, match="x must have dtype"):
        tk.channel_stats(x.to(torch.int32))
    with pytest.raises(ValueError, match="gc must be a contiguous torch.float32 tensor of 16"):
        tk.spatial_stats(x, gc[:1])
    with pytest.raises(ValueError, match="gc must be a contiguous torch.float32"):
        tk.gate_apply(x, gc.double(), None)
    with pytest.raises(ValueError, match="gs must be a contiguous"):
        tk.gate_apply(x, gc, gs.t().contiguous().t()[:, :29])
    with pytest.raises(ValueError, match="grad_out must be NCHW-contiguous like x"):
        tk.gate_apply_backward(x.contiguous(memory_format=torch.channels_last), x, gc, gs, True, True)
    with pytest.raises(ValueError, match="grad_out must have x's shape"):
        tk.gate_apply_backward(x[:1], x, gc, gs, True, True)
    with pytest.raises(ValueError, match="scount must be a contiguous torch.int32"):
        tk.spatial_stats_backward(x, gc, smax, scount.float(), smax, smax)
    with pytest.raises(ValueError, match="need gc"):
        tk.gating_input_grad(x, None, None, None, smax, scount, smax, None)
    with pytest.raises(ValueError, match="grad_smax needs smax and scount"):
        tk.gating_input_grad(x, None, gc, None, None, None, None, smax)
    with pytest.raises(ValueError, match="grad_cmax needs cmax and ccount"):
        tk.gating_input_grad(x, None, None, None, grad_cmax=gc)
    with pytest.raises(ValueError, match="ms must be a contiguous"):
        tk.bam_combine(x, gc, gc, False)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="gc must be .* on cpu"):
            tk.gate_apply(x, gc.to("meta"), None)
