"""The Triton gating kernels (under TRITON_INTERPRET=1 on CPU tensors when no GPU is present)
against the reference, primitive by primitive, on the same case matrix as the C++ kernels."""
import pytest

from tests.cases import all_cases
from tests.primitives import check_deterministic, check_primitives, check_rejects_non_dense


@pytest.fixture(scope="module")
def tk():
    from attnkern.triton import gating

    return gating


@pytest.mark.parametrize("shape,layout,dtype", all_cases())
def test_primitives_match_reference(tk, shape, layout, dtype):
    if layout == "sliced":
        layout = "contiguous"  # the ops layer hands backends a dense copy of a sliced view
    check_primitives(tk, shape, layout, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ties_count_like_amax(tk, layout):
    check_primitives(tk, (2, 24, 9, 11), layout, tk.SUPPORTED_DTYPES[0], ties=True)


def test_deterministic(tk):
    check_deterministic(tk)


def test_rejects_bad_arguments(tk):
    check_rejects_non_dense(tk)
