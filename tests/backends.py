"""The fixture that runs a test once per forced backend (``ATTNKERN_BACKEND``): the C++/ATen
CPU path, the Triton kernels (on CPU tensors under the interpreter) and, where listed, the
pure-PyTorch reference."""
import pytest


def forced_backend_fixture(*names: str):
    """A ``backend`` fixture parametrised over ``names``; the Triton case skips without triton."""

    @pytest.fixture(params=list(names))
    def backend(request, monkeypatch):
        if request.param == "triton":
            pytest.importorskip("triton")
        monkeypatch.setenv("ATTNKERN_BACKEND", request.param)
        return request.param

    return backend
