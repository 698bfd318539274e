"""What the gating blocks hand ``torch.compile`` (attnkern._backend.compile_policy): on CPU by
default their reference math, which the compiler fuses with the neighbouring layers (CBAM's
spatial convolution, opaque to the compiler either way, keeps its kernel); with
``ATTNKERN_COMPILE=kernels`` (or a forced backend) the attnkern ops. Either way the compiled
model computes what the eager one does, forward and backward, with no graph break."""
import copy

import pytest
import torch
from torch import nn

import attnkern
from attnkern.nn import BAM, CBAM, SqueezeExcite
from tests.cases import make_input
from tests.tolerance import assert_close

BLOCKS = {
    "cbam": lambda: CBAM(24),
    "se": lambda: SqueezeExcite(24),
    "bam": lambda: BAM(24, rd_ratio=0.25),
}


def _model(block):
    torch.manual_seed(3)
    # no conv bias before the BatchNorm: its true gradient is 0, its computed one pure rounding
    return nn.Sequential(nn.Conv2d(8, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), BLOCKS[block](), nn.ReLU()).train()


def _compiled_graph_ops(model, x):
    """Compile ``model`` with a backend that records dynamo's graph; the set of attnkern ops
    in it, and the compiled module."""
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, fullgraph=True)
    compiled(x)
    return {t for t in targets if "attnkern" in t}, compiled


# Biases that feed a training-mode BatchNorm: their true gradient is 0 and the computed one is
# rounding noise scaled by 1/std of a batch of 2, so two summation orders differ arbitrarily.
NOISE_ONLY = ("channel.fc1.bias", "conv_reduce.bias", "conv_di.0.bias", "conv_di.1.bias")


def _run(model, x, g):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(g)
    return out, [x.grad] + [p.grad for n, p in model.named_parameters() if not n.endswith(NOISE_ONLY)]


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("policy", ["auto", "kernels", "decompose"])
def test_compiled_block_matches_eager_under_each_policy(block, policy, monkeypatch):
    monkeypatch.delenv("ATTNKERN_BACKEND", raising=False)
    monkeypatch.setenv("ATTNKERN_COMPILE", policy)
    eager = _model(block)
    x = make_input((2, 8, 9, 7), "contiguous", torch.float32)
    g = make_input((2, 24, 9, 7), "contiguous", torch.float32, seed=1)
    ops, _ = _compiled_graph_ops(copy.deepcopy(eager), x)
    if policy == "kernels":
        assert ops, "ATTNKERN_COMPILE=kernels: the compiled graph should call the attnkern ops"
    elif policy == "auto":  # CPU tensors: plain ATen ops the compiler can fuse, but CBAM's
        # spatial convolution, an opaque call either way, keeps its direct kernels
        assert ops <= {"attnkern.spatial_conv"}, f"ATTNKERN_COMPILE=auto: attnkern ops {ops} left in the graph"
        assert ("attnkern.spatial_conv" in ops) == (block == "cbam")
    else:  # decompose: nothing but ATen ops
        assert not ops, f"ATTNKERN_COMPILE={policy}: attnkern ops {ops} left in the graph"
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    out, grads = _run(eager, x, g)
    c_out, c_grads = _run(compiled, x, g)
    assert_close(c_out, out, name="out")
    for i, (a, b) in enumerate(zip(c_grads, grads)):
        assert_close(a, b, name=f"grad {i}")


def test_a_forced_backend_keeps_the_kernels_under_compile(monkeypatch):
    monkeypatch.setenv("ATTNKERN_BACKEND", "cpu")
    monkeypatch.delenv("ATTNKERN_COMPILE", raising=False)
    ops, _ = _compiled_graph_ops(_model("cbam"), make_input((2, 8, 9, 7), "contiguous", torch.float32))
    assert ops


def test_eager_blocks_ignore_the_policy(monkeypatch):
    """The policy only acts while torch.compile traces: eager code runs the kernels."""
    monkeypatch.delenv("ATTNKERN_BACKEND", raising=False)
    monkeypatch.setenv("ATTNKERN_COMPILE", "decompose")
    calls = []
    with torch.autograd.profiler.profile() as prof:
        _model("cbam")(make_input((2, 8, 9, 7), "contiguous", torch.float32))
    calls = [e.name for e in prof.function_events if e.name.startswith("attnkern::")]
    assert "attnkern::gate_apply" in calls


def test_unknown_policy_is_named(monkeypatch):
    monkeypatch.setenv("ATTNKERN_COMPILE", "fast")
    monkeypatch.delenv("ATTNKERN_BACKEND", raising=False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"ATTNKERN_COMPILE must be one of \('auto', 'kernels', 'decompose'\), got 'fast'"):
        torch.compile(_model("se"), fullgraph=True)(make_input((2, 8, 9, 7), "contiguous", torch.float32))
