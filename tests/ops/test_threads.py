"""The blocks called from several Python threads at once give exactly what sequential calls
give: forward and backward of CBAM, SE and BAM on the C++ backend (whose kernels run their
own OpenMP loops inside each calling thread) and on the reference."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

from attnkern.nn import BAM, CBAM, SqueezeExcite

N_THREADS = 4
ROUNDS = 3


def _block(name):
    torch.manual_seed(0)
    return {"cbam": lambda: CBAM(32, rd_channels=4),
            "se": lambda: SqueezeExcite(32, rd_channels=8, add_maxpool=True),
            "bam": lambda: BAM(32, rd_channels=4, num_dilated=1, combine="product")}[name]().train()


def _inputs(i):
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(2, 32, 13, 11, generator=g)
    if i % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(2, 32, 13, 11, generator=g)


def _step(module, x, g):
    """Forward and backward on a private copy of the module: output, dx, parameter grads."""
    m = copy.deepcopy(module)
    x = x.clone().requires_grad_()
    out = m(x)
    out.backward(g)
    return [out.detach(), x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("block", ["cbam", "se", "bam"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_concurrent_calls_equal_sequential(monkeypatch, backend, block):
    monkeypatch.setenv("ATTNKERN_BACKEND", backend)  # process-wide: every thread sees it
    module = _block(block)
    inputs = [_inputs(i) for i in range(N_THREADS)]
    expected = [_step(module, *inputs[i]) for i in range(N_THREADS)]

    results = [[None] * ROUNDS for _ in range(N_THREADS)]
    errors = []
    barrier = threading.Barrier(N_THREADS)

    def work(i):
        try:
            barrier.wait(timeout=60)
            for r in range(ROUNDS):
                results[i][r] = _step(module, *inputs[i])
        except BaseException as e:  # noqa: BLE001  (reported below, with the thread)
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, f"errors in threads: {errors}"
    for i in range(N_THREADS):
        for r in range(ROUNDS):
            for k, (a, b) in enumerate(zip(results[i][r], expected[i])):
                assert torch.equal(a, b), f"thread {i} round {r}: result {k} differs from the sequential call"
