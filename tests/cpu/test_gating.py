"""The C++ gating kernels against the reference, primitive by primitive, on the case matrix,
under every vector ISA this CPU runs (each has its own copy of the kernels)."""
import pytest
import torch

from attnkern import _cpu
from tests.cases import all_cases
from tests.primitives import check_deterministic, check_primitives, check_rejects_non_dense


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


def test_deterministic(ext):
    check_deterministic(ext)


def test_rejects_bad_arguments(ext):
    check_rejects_non_dense(ext)
