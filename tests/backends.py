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


def assert_registered_with_cpu_kernels(schemas):
    """Each ``attnkern::`` op of ``schemas`` (name -> schema, as its ``attnkern/ops`` module
    defines them for builds without C++) has that schema in the dispatcher, a CPU kernel
    registered from ``csrc/``, a Meta (fake) kernel and the reference as its
    CompositeExplicitAutograd kernel."""
    import torch

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name, schema in schemas.items():
        assert str(getattr(torch.ops.attnkern, name).default._schema) == f"attnkern::{name}{schema}"
        qualname = f"attnkern::{name}"
        assert has(qualname, "CPU") and has(qualname, "Meta") and has(qualname, "CompositeExplicitAutograd")
        cpu = [line for line in torch._C._dispatch_dump(qualname).splitlines() if line.startswith("CPU:")]
        assert len(cpu) == 1 and "csrc/" in cpu[0], cpu
