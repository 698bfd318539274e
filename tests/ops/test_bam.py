"""The fused BAM combine on every backend against the reference, on the shared case matrix."""
import copy

import pytest
import torch

from attnkern.nn import BAM
from attnkern.reference import bam as ref
from tests.cases import all_cases, make_input
from tests.ops.blocks import compare, run as _run
from tests.ops.test_cbam import backend  # noqa: F401  (the backend fixture)
from tests.tolerance import assert_close


class _Ref(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return ref.bam(x, self.m.channel, self.m.spatial, combine=self.m.combine)[0]


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("shape,layout,dtype", all_cases())
def test_bam_matches_reference(backend, shape, layout, dtype, combine):
    torch.manual_seed(0)
    train = shape[0] > 1  # BatchNorm1d on the pooled vector cannot train on batch 1
    base = BAM(shape[1], combine=combine).train(train)
    ours = copy.deepcopy(base).to(dtype)
    x = make_input(shape, layout, dtype)
    g = make_input(shape, "contiguous", dtype, seed=1)
    out = compare(ours, _Ref(copy.deepcopy(base)), x, g, dtype, [n for n, _ in ours.named_parameters()])
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_bam_gradcheck_float64(backend):
    if backend == "triton":
        pytest.skip("float64 gradcheck runs on the C++ backend")
    torch.manual_seed(1)
    for combine in ("sum", "product"):
        m = BAM(16, combine=combine, rd_channels=2, dilation=1).double().eval()
        x = torch.randn(2, 16, 5, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


def test_bam_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("ATTNKERN_BACKEND", "cpu")
    torch.manual_seed(2)
    m = BAM(32, combine="product").train()
    cf = torch.compile(copy.deepcopy(m), fullgraph=True)
    x = make_input((2, 32, 9, 7), "contiguous", torch.float32)
    g = make_input((2, 32, 9, 7), "contiguous", torch.float32, seed=1)
    out, grads = _run(m, x, g)
    c_out, c_grads = _run(cf, x, g)
    assert_close(c_out, out, name="out")
    for i, (a, b) in enumerate(zip(c_grads, grads)):
        assert_close(a, b, name=f"grad {i}")
