"""The fused CBAM op on every backend against the reference (timm's CbamModule math), on the
shared case matrix: forward, input and parameter gradients, BatchNorm in train and eval."""
import copy

import pytest
import torch
from timm.layers.cbam import CbamModule

import attnkern
from attnkern.compare import saved_bytes
from attnkern.nn import CBAM
from tests.cases import all_cases, make_input
from tests.ops.blocks import compare, run
from tests.tolerance import assert_close

BACKENDS = ["cpu", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("ATTNKERN_BACKEND", request.param)
    return request.param


_run = run


def _timm(C, train, seed=0):
    torch.manual_seed(seed)
    m = CbamModule(C).train(train)
    with torch.no_grad():  # non-trivial BN affine and running stats
        bn = m.spatial.conv.bn
        bn.weight.fill_(1.3)
        bn.bias.fill_(-0.2)
        bn.running_mean.fill_(0.1)
        bn.running_var.fill_(0.7)
    return m


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape,layout,dtype", all_cases())
def test_cbam_matches_reference(backend, shape, layout, dtype, train):
    if train and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("BatchNorm cannot train on one value per channel (its own error, tested below)")
    ref_m = _timm(shape[1], train)
    ours = CBAM.from_timm(copy.deepcopy(ref_m)).to(dtype)
    x = make_input(shape, layout, dtype)
    g = make_input(shape, "contiguous", dtype, seed=1)
    out = compare(ours, ref_m, x, g, dtype, [n for n, _ in ours.named_parameters()])
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    if train and dtype == torch.float32:
        ref_m(x)  # one training step of the fp32 reference: same running stats
        assert_close(ours.spatial.conv.bn.running_mean.float(), ref_m.spatial.conv.bn.running_mean,
                     name="running_mean")


@pytest.mark.parametrize("pool_order", ["mean_max", "max_mean"])
def test_gates_returned_equal_reference(backend, pool_order):
    from attnkern.reference import cbam as ref

    torch.manual_seed(3)
    m = CBAM(40, mlp_bias=True, pool_order=pool_order).eval()
    x = make_input((2, 40, 9, 11), "channels_last", torch.float32)
    out, gc, gs = attnkern.functional.cbam(x, m.channel, m.spatial, pool_order=pool_order)
    r_out, r_gc, r_gs = ref.cbam(x, m.channel, m.spatial, pool_order=pool_order)
    assert gc.dtype == torch.float32 and gc.shape == (2, 40)
    assert gs.dtype == torch.float32 and gs.shape == (2, 1, 9, 11)
    assert_close(out, r_out, name="out")
    assert_close(gc, r_gc, name="gc")
    assert_close(gs, r_gs, name="gs")
    m.keep_gates = True
    m(x)
    assert_close(m.last_gates[1], r_gs, name="last_gates")


def test_deterministic(backend):
    torch.manual_seed(4)
    m = CBAM(72).train()
    x = make_input((2, 72, 13, 11), "channels_last", torch.float32)
    g = make_input((2, 72, 13, 11), "channels_last", torch.float32, seed=5)
    runs = []
    with torch.random.fork_rng():
        torch.use_deterministic_algorithms(True)
        try:
            for _ in range(2):
                mm = copy.deepcopy(m)
                out, grads = _run(mm, x, g)
                runs.append([out] + grads)
        finally:
            torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradcheck_float64(backend):
    if backend == "triton":
        pytest.skip("float64 gradcheck runs on the C++ backend (the Triton kernels are checked in fp32/bf16/fp16)")
    torch.manual_seed(6)
    m = CBAM(6, rd_channels=3, spatial_kernel_size=3, mlp_bias=True).double().train()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(m, dict(zip([n for n, _ in m.named_parameters()], ps))):
            return m(x)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: m(x), (xc,), eps=1e-6, atol=1e-6)


def test_only_parameter_gradients(backend):
    """x without grad: passes A and B still give the parameters their gradients."""
    torch.manual_seed(7)
    m = CBAM(24).train()
    ref = copy.deepcopy(m)
    x = make_input((2, 24, 7, 9), "contiguous", torch.float32)
    m(x).sum().backward()
    import attnkern.reference.cbam as rc

    rc.cbam(x, ref.channel, ref.spatial)[0].sum().backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, name=n)


def test_loss_on_gates_only(backend):
    """A loss on the returned gates alone (the output unused): dx has no dout term."""
    import attnkern.reference.cbam as rc

    torch.manual_seed(8)
    m = CBAM(24).train()
    ref = copy.deepcopy(m)
    x = make_input((2, 24, 7, 9), "contiguous", torch.float32).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    _, gc, gs = attnkern.functional.cbam(x, m.channel, m.spatial)
    _, r_gc, r_gs = rc.cbam(x2, ref.channel, ref.spatial)
    (gc.square().sum() + gs.sum()).backward()
    (r_gc.square().sum() + r_gs.sum()).backward()
    assert_close(x.grad, x2.grad, name="dx")


def test_torch_compile_fullgraph_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) of a model containing attnkern.CBAM: no graph break, same
    output and gradients as eager (C++ backend)."""
    monkeypatch.setenv("ATTNKERN_BACKEND", "cpu")
    torch.manual_seed(9)
    block = torch.nn.Sequential(torch.nn.Conv2d(8, 24, 3, padding=1), CBAM(24), torch.nn.ReLU()).train()
    compiled_block = copy.deepcopy(block)
    cf = torch.compile(compiled_block, fullgraph=True, backend="inductor")
    x = make_input((2, 8, 9, 7), "contiguous", torch.float32)
    g = make_input((2, 24, 9, 7), "contiguous", torch.float32, seed=1)
    out, grads = _run(block, x, g)
    c_out, c_grads = _run(cf, x, g)
    assert_close(c_out, out, name="out")
    for i, (a, b) in enumerate(zip(c_grads, grads)):
        assert_close(a, b, name=f"grad {i}")


def test_saved_for_backward_is_about_one_input(backend):
    """Saved-for-backward bytes of one CBAM (unique storages, via saved_tensors_hooks) stay
    within 1.05x the input's bytes at C = 256: x itself and [B, C] / [B, HW] statistics only."""
    torch.manual_seed(10)
    m = CBAM(256).train()  # the target's channel count: per-pixel statistics cost 1/C each
    x = make_input((2, 256, 28, 28), "contiguous", torch.float32).requires_grad_()
    saved = saved_bytes(m, x)
    assert saved <= 1.05 * x.numel() * x.element_size(), (saved, x.numel() * x.element_size())
