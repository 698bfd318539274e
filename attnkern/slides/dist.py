"""Running the profile job under ``torchrun`` (one node or many): each rank takes its shard of
the tiles, rank 0 gathers the figures and the heatmap and writes the outputs. gloo on CPU,
nccl on GPU. Without torchrun everything here is a no-op for a world of one."""
from __future__ import annotations

import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist


def setup(device: str) -> Tuple[int, int, str, bool]:
    """(rank, world size, this rank's device, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    started = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        started = True
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    else:  # share the node's cores between its ranks
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return dist.get_rank(), dist.get_world_size(), device, started


def shard(n: int, rank: int, world: int) -> List[int]:
    """The indices of ``n`` items this rank takes (round robin: every rank gets tissue from
    every part of the slide)."""
    return list(range(rank, n, world))


def gather(obj: Any, world: int) -> List[Any]:
    """``obj`` from every rank, in rank order (every rank gets the list)."""
    if world <= 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def merge_figures(figs: List[dict]) -> dict:
    """One variant's figures over all ranks: tiles add up, the wall time is the slowest rank's."""
    if len(figs) == 1:
        return figs[0]
    tiles = sum(f["tiles"] for f in figs)
    seconds = max(f["seconds"] for f in figs)
    read = sum(f["read_seconds"] for f in figs)
    compute = sum(f["compute_seconds"] for f in figs)
    return dict(tiles=tiles, seconds=seconds, read_seconds=read, compute_seconds=compute,
                tiles_per_s=tiles / seconds if seconds else 0.0,
                peak_rss_mb=max(f["peak_rss_mb"] for f in figs),
                bound="read" if read > compute else "compute", ranks=figs)
