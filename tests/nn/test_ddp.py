"""DistributedDataParallel: two CPU processes (gloo on 127.0.0.1) train a converted CBAM-ResNet
for a few SGD steps, each on its half of every batch; the weights stay identical on both
ranks and equal a single-process run of the unconverted timm model on the same data.

The single-process run reproduces exactly what DDP computes, so the comparison needs no
slack beyond rounding: two replicas of the model each run one half of the batch in training
mode (BatchNorm normalises per rank, over its half), the two gradients are averaged (DDP's
all-reduce), and, as DDP's default ``broadcast_buffers=True`` does at every forward, replica 1
starts each step with replica 0's BatchNorm statistics. float64 throughout and 8 samples per
rank: training-mode BatchNorm over the last stage's 1x1 maps normalises over the batch alone,
and over 3 samples it amplifies rounding ~1000x per SGD step (1e-7 relative after 3 steps even
in float64, between two correct implementations); over 8 the run stays at ~1e-12.
"""
import copy
import datetime
import os
import socket
import time

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import attnkern
from attnkern.nn import CBAM
from tests.tolerance import assert_close

WORLD = 2
STEPS = 3
PER_RANK = 8
LR, MOMENTUM = 0.1, 0.9
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _model():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=4, zero_init_last=False,
                             block_args=dict(attn_layer="cbam")).double().train()


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * PER_RANK, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (WORLD * PER_RANK,), generator=g)
    return x, y


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = attnkern.convert(_model())
        assert sum(isinstance(m, CBAM) for m in model.modules()) == 8
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
        for step in range(STEPS):
            x, y = _batch(step)
            part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            loss = F.cross_entropy(ddp(x[part]), y[part])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(out_dir):
    ctx = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} DDP processes did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def _single_process():
    """Replicas of the timm model, one per rank, stepped as DDP steps them."""
    replicas = [_model() for _ in range(WORLD)]
    opts = [torch.optim.SGD(r.parameters(), lr=LR, momentum=MOMENTUM) for r in replicas]
    for step in range(STEPS):
        x, y = _batch(step)
        for r in replicas[1:]:  # broadcast_buffers: rank 0's statistics at the start of forward
            for b, b0 in zip(r.buffers(), replicas[0].buffers()):
                b.copy_(b0)
        grads = []
        for rank, r in enumerate(replicas):
            part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            r.zero_grad()
            F.cross_entropy(r(x[part]), y[part]).backward()
            grads.append([p.grad.clone() for p in r.parameters()])
        mean = [sum(gs) / WORLD for gs in zip(*grads)]
        for r, opt in zip(replicas, opts):
            for p, g in zip(r.parameters(), mean):
                p.grad.copy_(g)
            opt.step()
    return [r.state_dict() for r in replicas]


def test_ddp_two_processes_match_single_process(tmp_path):
    _spawn(str(tmp_path))
    sds = [torch.load(str(tmp_path / f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    refs = _single_process()
    init = _model().state_dict()
    params = {n for n, _ in _model().named_parameters()}

    assert list(sds[0]) == list(sds[1]) == list(refs[0])
    moved = 0
    for k in sds[0]:
        if k in params:  # the same weights on both ranks, bit for bit
            assert torch.equal(sds[0][k], sds[1][k]), f"{k} differs between the ranks"
            moved += not torch.equal(sds[0][k], init[k])
        for rank in range(WORLD):
            if sds[rank][k].is_floating_point():
                # relative to the tensor's size: weights of 0.02 and BN variances of 1 alike
                scale = refs[rank][k].abs().max().item()
                assert_close(sds[rank][k], refs[rank][k], name=f"rank {rank} {k}", scale=scale)
            else:
                assert torch.equal(sds[rank][k], refs[rank][k]), f"rank {rank} {k}"
    assert moved == len(params), "every parameter should have been trained"
