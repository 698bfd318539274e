"""The C++ gating kernels against the reference, primitive by primitive, on the case matrix,
under every vector ISA this CPU runs (each has its own copy of the kernels)."""
import pytest
import torch

from attnkern import _cpu
from tests.cases import all_cases
from attnkern.reference import gating as ref
from tests.cases import make_input
from tests.primitives import _acc, _close_big, _close_small, check_deterministic, check_primitives, check_rejects_non_dense


# the ISAs of the copies this CPU runs ("DEFAULT" only when the build is missing: the fixture fails)
CAPABILITIES = _cpu.cpu_capabilities() if _cpu.extension() is not None else ["DEFAULT"]


@pytest.fixture(scope="module", params=CAPABILITIES)
def ext(request):
    ext = _cpu.require()  # CI builds the extension: a missing build fails, it does not skip
    before = _cpu.set_cpu_capability(request.param)
    yield ext
    _cpu.set_cpu_capability(before)


@pytest.mark.parametrize("shape,layout,dtype", all_cases() + [
    pytest.param((2, 72, 7, 9), "channels_last", torch.float64, id="2x72x7x9-channels_last-float64"),
    pytest.param((3, 5, 9, 7), "contiguous", torch.float64, id="3x5x9x7-contiguous-float64"),
])
def test_primitives_match_reference(ext, shape, layout, dtype):
    if layout == "sliced":
        layout = "contiguous"  # the ops layer hands backends a dense copy of a sliced view
    check_primitives(ext, shape, layout, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ties_count_like_amax(ext, layout):
    check_primitives(ext, (2, 24, 9, 11), layout, torch.float32, ties=True)


def test_large_batch_across_parallel_chunks(ext):
    check_primitives(ext, (16, 48, 33, 35), "channels_last", torch.float32)
    check_primitives(ext, (16, 48, 33, 35), "contiguous", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_long_rows_with_a_partial_channel_group(ext, dtype):
    # NCHW channels in groups: four at a time in spatial_stats_backward (rows of 2048+ pixels)
    # and in gate_apply_backward / bam_combine_backward (rows split into pixel blocks, as at
    # batch 1 here), eight in spatial_stats: 7 and 11 channels end in partial groups
    check_primitives(ext, (2, 7, 45, 50), "contiguous", dtype)
    check_primitives(ext, (1, 11, 64, 33), "contiguous", dtype, ties=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_channels_last_chunks_with_a_partial_vector(ext, dtype):
    # channels_last passes over pixels: 8 chunks of up to 64 pixels per image, prefetching
    # ahead until the last rows of the tensor; 37 channels end in a partial vector, which the
    # merge of the chunks takes one channel at a time
    check_primitives(ext, (2, 37, 20, 23), "channels_last", dtype)
    check_primitives(ext, (2, 37, 20, 23), "channels_last", dtype, ties=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_channels_last_pixel_same_in_a_lane_group_as_alone(ext, dtype):
    # channels_last reductions along a pixel's channels merge their vector lanes 8 or 16 pixels
    # at a time (spatial_stats; the per-pixel gradients of the passes over both axes, here
    # gate_apply_backward's): each pixel must come out bitwise as it does alone. (BAM's per-pixel
    # gradient is not compared: its gate takes exp over the image's logits, whose last bits
    # depend on where a logit falls in ATen's vector exp.) 2 x 45 pixels make full groups and a
    # rest; 37 channels end in a partial vector; a NaN, an inf, a -0.0 max and ties sit inside
    # groups.
    B, C, H, W = 2, 37, 5, 9
    a = torch.float64 if dtype == torch.float64 else torch.float32
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    x = make_input((B, C, H, W), "contiguous", dtype)
    x[0, :, 1, 2] = -x[0, :, 1, 2].abs() - 1
    x[0, 4, 1, 2] = -0.0                    # a pixel whose max is -0.0, tied with +0.0
    x[0, 9, 1, 2] = 0.0
    x[0, ::3, 2, 3] = 0.75                  # ties
    x[1, 6, 0, 4] = float("nan")
    x[1, 30, 3, 1] = float("inf")
    x = cl(x)
    dout = cl(make_input((B, C, H, W), "contiguous", dtype, seed=3))
    g = torch.Generator().manual_seed(5)
    gc = torch.rand(B, C, generator=g, dtype=a)
    gc[:, ::4] = 1.0
    gs = torch.randn(B, H * W, generator=g, dtype=a)
    stats = ext.spatial_stats(x, gc)
    grad_gs = ext.gate_apply_backward(dout, x, gc, gs, True, True)[1]
    same = lambda u, v: u.view(-1).view(torch.uint8).equal(v.view(-1).view(torch.uint8))  # noqa: E731
    for b in range(B):
        for h in range(H):
            for w in range(W):
                # "alone": in a channels_last tensor of two pixels (one pixel would be NCHW too)
                w0 = min(w, W - 2)
                i, j, k = h * W + w, h * W + w0, w - w0
                xp, dp = x[b:b + 1, :, h:h + 1, w0:w0 + 2], dout[b:b + 1, :, h:h + 1, w0:w0 + 2]
                assert xp.is_contiguous(memory_format=torch.channels_last) and not xp.is_contiguous()
                alone = ext.spatial_stats(xp, gc[b:b + 1])
                for got, exp, name in zip(stats, alone, ("mean", "max", "count")):
                    assert same(got[b, i:i + 1], exp[0, k:k + 1]), (name, b, h, w)
                g1 = ext.gate_apply_backward(dp, xp, gc[b:b + 1], gs[b:b + 1, j:j + 2], True, True)[1]
                assert same(grad_gs[b, i:i + 1], g1.reshape(-1)[k:k + 1]), ("grad_gs", b, h, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_nchw_channel_row_same_in_a_lane_group_as_alone(ext, dtype):
    # NCHW channel_stats merges the vector lanes of 8 or 16 channel rows at a time, and loads a
    # row's last partial vector zero-padded (bfloat16 rows in element pairs): each row must
    # come out bitwise as it does alone. 3 x 13 rows of 13x7 = 91 pixels (two full float32
    # vectors under AVX-512 and a partial one) make full groups and a rest; a NaN, an inf, a
    # -0.0 max tied with +0.0, a row of -inf and ties sit inside groups, some in the partial
    # vector.
    B, C, H, W = 3, 13, 13, 7
    x = make_input((B, C, H, W), "contiguous", dtype)
    x[0, 2] = -x[0, 2].abs() - 1
    x[0, 2, 3, 1], x[0, 2, 12, 6] = -0.0, 0.0   # max -0.0 / +0.0, the second in the partial vector
    x[0, 5, ::2] = 0.75                         # ties, also in the partial vector
    x[0, 5, 0, 0] = 0.5
    x[1, 1] = float("-inf")                     # max -inf, every element tied
    x[1, 7, 12, 5] = float("nan")               # in the partial vector
    x[2, 3, 4, 4] = float("inf")
    stats = ext.channel_stats(x)
    same = lambda u, v: u.view(-1).view(torch.uint8).equal(v.view(-1).view(torch.uint8))  # noqa: E731
    for b in range(B):
        for c in range(C):
            alone = ext.channel_stats(x[b:b + 1, c:c + 1].contiguous())
            for got, exp, name in zip(stats, alone, ("mean", "max", "count")):
                assert same(got[b, c:c + 1], exp[0, :1]), (name, b, c)
    assert torch.equal(stats[2], ref.channel_stats(x)[2]), "tie counts"
    assert int(stats[2][1, 1]) == H * W and int(stats[2][0, 2]) == 2, "counts of the -inf and -0.0 rows"


def _check_stats(got, exp, what, dtype):
    # mean within tolerance; max (NaN where the reference's is) and tie count exactly
    _close_small(got[0], exp[0], f"mean, {what}", dtype)
    assert torch.equal(got[1].isnan(), exp[1].isnan()), ("max NaN", what)
    assert torch.equal(got[1].nan_to_num(), exp[1].nan_to_num()), ("max", what)
    assert torch.equal(got[2], exp[2]), ("count", what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_per_element_statistics_land_on_their_element_at_every_length(ext, dtype):
    # NCHW spatial_stats (one running mean / max / count per pixel, over the channels) and
    # channels_last channel_stats (one per channel, over the pixels) keep their accumulators in
    # vector steps, bfloat16 ones in element pairs (even elements, then odd), and take a last
    # partial step for a segment's rest. Every segment length from 1 to 70 covers rests shorter
    # and longer than a vector under both ISAs; a NaN, ties and an inf sit in the rest.
    for n in range(1, 71):
        x = make_input((1, 5, 1, n), "contiguous", dtype, seed=n)
        x[0, :, 0, 0] = 0.75                    # ties in the first element
        x[0, 2, 0, n - 1] = float("nan")        # the last element, in the rest
        x[0, 4, 0, n // 2] = float("inf")
        gc = torch.rand(1, 5, generator=torch.Generator().manual_seed(n), dtype=_acc(dtype)) + 0.5
        _check_stats(ext.spatial_stats(x, gc), ref.spatial_stats(x, gc), f"spatial, {n} pixels", dtype)

        x = make_input((1, n, 3, 5), "contiguous", dtype, seed=n).contiguous(memory_format=torch.channels_last)
        x[0, 0] = 0.75
        x[0, n - 1, 1, 2] = float("nan")
        x[0, n // 2, 2, 4] = float("inf")
        _check_stats(ext.channel_stats(x), ref.channel_stats(x), f"channel, {n} channels", dtype)


def _check_row_passes(ext, x, gc, dtype, what):
    # spatial_stats, spatial_stats_backward through its max, and gate_apply_backward, against
    # the reference
    exp = ref.spatial_stats(x, gc)
    _check_stats(ext.spatial_stats(x, gc), exp, f"spatial, {what}", dtype)
    g = torch.Generator().manual_seed(x.shape[1] * x.shape[3])
    dsm, dsx = (torch.randn(exp[0].shape, generator=g, dtype=_acc(dtype)) for _ in range(2))
    _close_small(ext.spatial_stats_backward(x, gc, exp[1], exp[2], dsm, dsx),
                 ref.spatial_stats_backward(x, gc, exp[1], exp[2], dsm, dsx), f"spatial backward, {what}", dtype)
    gs = torch.rand(exp[0].shape, generator=g, dtype=_acc(dtype)) + 0.5
    dout = torch.empty_like(x).copy_(torch.randn(x.shape, generator=g))  # x's strides
    got, exp = ext.gate_apply_backward(dout, x, gc, gs, True, True), ref.gate_apply_backward(dout, x, gc, gs, True, True)
    _close_small(got[0], exp[0], f"grad gc, {what}", dtype)
    _close_small(got[1], exp[1], f"grad gs, {what}", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_rows_with_a_per_element_operand_at_every_length(ext, dtype):
    # channels_last spatial_stats (x * gc over a pixel's channels), spatial_stats_backward and
    # gate_apply_backward in both layouts read a per-element operand beside each row (gc along
    # the channels; the per-pixel weights, maxima and gates along the pixels). bfloat16 rows in
    # channels_last load in element pairs with the operand put in the same order, and a row's
    # rest is one zero-padded vector step. Every row length from 1 to 70 covers rests shorter
    # and longer than a vector under both ISAs; the last row element repeats the first, so
    # maxima tie across the rest.
    for n in range(1, 71):
        g = torch.Generator().manual_seed(n)
        x = make_input((2, n, 3, 5), "contiguous", dtype, seed=n)    # rows of n channels
        gc = torch.rand(2, n, generator=g, dtype=_acc(dtype)) + 0.5
        x[:, n - 1], gc[:, n - 1] = x[:, 0], gc[:, 0]
        _check_row_passes(ext, x.contiguous(memory_format=torch.channels_last), gc, dtype, f"{n} channels")

        x = make_input((2, 6, 1, n), "contiguous", dtype, seed=n)    # rows of n pixels
        gc = torch.rand(2, 6, generator=g, dtype=_acc(dtype)) + 0.5
        x[:, 5], gc[:, 5] = x[:, 1], gc[:, 1]
        _check_row_passes(ext, x, gc, dtype, f"{n} pixels")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bam_logits_beyond_the_split_form(ext, layout, dtype):
    # z = mc + ms: the kernels take e^-mc * e^-ms unless an image has a logit beyond +-40.
    # Image 1 pairs mc = -100 with ms = +100 (z = 0, gate 1/2), where e^100 overflows float32;
    # image 2 has large logits of one sign only. Image 0 is ordinary.
    B, C, H, W = 3, 19, 7, 9
    x = make_input((B, C, H, W), layout, dtype)
    x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    dout = make_input((B, C, H, W), layout, dtype, seed=3)
    dout = dout.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    a = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(11)
    mc, ms = torch.randn(B, C, generator=g, dtype=a), torch.randn(B, H * W, generator=g, dtype=a)
    mc[1, ::2] -= 100
    ms[1, ::3] += 100
    mc[2, 5] = 45
    ms[2, :10] -= 60
    f32 = lambda t: t.to(a)  # noqa: E731
    _close_big(ext, "bam_combine", (x, mc, ms, False), (f32(x), mc, ms, False), dtype, "bam out")
    got = ext.bam_combine_backward(dout, x, mc, ms, False)
    exp = ref.bam_combine_backward(f32(dout), f32(x), mc, ms, False)
    _close_small(got[0], exp[0], "dmc", dtype)
    _close_small(got[1], exp[1], "dms", dtype)
    _close_big(ext, "bam_input_grad", (x, dout, mc, ms, False, None), (f32(x), f32(dout), mc, ms, False, None),
               dtype, "bam dx")


def test_deterministic(ext):
    check_deterministic(ext)


def test_rejects_bad_arguments(ext):
    check_rejects_non_dense(ext)


@pytest.mark.skipif("AVX512_BF16" not in CAPABILITIES, reason="this CPU has no AVX512_BF16")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bf16_stores_round_as_the_avx512_copy(layout):
    # The AVX512_BF16 copy is the AVX512 copy with one change: its bfloat16 stores round with
    # VCVTNE2PS2BF16. Both round to nearest even, so every output the passes write in bfloat16
    # must have the AVX512 copy's bits (no subnormal or NaN output here: there the two differ).
    # Ties to even both ways: x holds powers of two 2^k on even rows and gc[:, ::2] = 1 + 2^-8,
    # so x * gc falls halfway between two bfloat16 values with an even last bit; on odd rows x
    # is (1 + 2^-7) 2^k, whose last bit is odd, and the residual 2^(k - 8) puts x + residual
    # halfway again. 37 channels and 5x9 pixels end rows in tails.
    ext = _cpu.require()
    B, C, H, W = 2, 37, 5, 9
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = make_input((B, C, H, W), "contiguous", torch.bfloat16)
    res = make_input((B, C, H, W), "contiguous", torch.bfloat16, seed=4)
    scale = torch.exp2(torch.randint(-6, 6, (B, C, H, W), generator=torch.Generator().manual_seed(2)).float())
    sign = torch.where(x < 0, -1.0, 1.0)
    x[:, :, ::2] = (sign * scale)[:, :, ::2].to(torch.bfloat16)
    x[:, :, 1::2] = (sign * scale * (1 + 2.0 ** -7))[:, :, 1::2].to(torch.bfloat16)
    res[:, :, 1::2] = (sign * scale * 2.0 ** -8)[:, :, 1::2].to(torch.bfloat16)
    x, res = x.contiguous(memory_format=fmt), res.contiguous(memory_format=fmt)
    dout = make_input((B, C, H, W), "contiguous", torch.bfloat16, seed=3).contiguous(memory_format=fmt)
    g = torch.Generator().manual_seed(5)
    gc = torch.rand(B, C, generator=g) + 0.5
    gc[:, ::2] = 1 + 2.0 ** -8
    gs = torch.rand(B, H * W, generator=g) + 0.5
    gs[:, ::3] = 1.0
    _, smax, scount = ext.spatial_stats(x, gc)
    _, cmax, ccount = ext.channel_stats(x)
    dsm, dsx, dcm, dcx = (torch.randn(n, generator=g).reshape(B, -1) for n in (B * H * W, B * H * W, B * C, B * C))
    mc, ms = torch.randn(B, C, generator=g), torch.randn(B, H * W, generator=g)
    passes = {
        "gate_apply": lambda: ext.gate_apply(x, gc, gs),
        "gate_apply_residual_": lambda: ext.gate_apply_residual_(x.clone(), gc, gs, res, True),
        "gate_apply_residual_ without gates": lambda: ext.gate_apply_residual_(x.clone(), None, None, res, False),
        "gate_apply_residual": lambda: ext.gate_apply_residual(x, gc, None, res, True),
        "gating_input_grad": lambda: ext.gating_input_grad(x, dout, gc, gs, smax, scount, dsm, dsx, cmax, ccount,
                                                           dcm, dcx),
        "bam_combine": lambda: ext.bam_combine(x, mc, ms, False),
        "bam_input_grad": lambda: ext.bam_input_grad(x, dout, mc, ms, False, dcm),
    }
    before = _cpu.cpu_capability()
    try:
        for name, run in passes.items():
            _cpu.set_cpu_capability("AVX512")
            want = run()
            _cpu.set_cpu_capability("AVX512_BF16")
            got = run()
            assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=fmt), name
            assert torch.isfinite(want).all(), name
            assert got.view(torch.int16).equal(want.view(torch.int16)), \
                f"{name}: {(got.view(torch.int16) != want.view(torch.int16)).sum().item()} outputs differ"
    finally:
        _cpu.set_cpu_capability(before)
