"""What every Triton launch of attnkern needs: whether the interpreter runs the kernels, and
the guard that launches on a tensor's own GPU whatever the current device is."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._backend import triton_interpret as interpret

__all__ = ["interpret", "device_guard"]


def device_guard(x: Tensor):
    """Launch on x's GPU whatever the current device is (a no-op for CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
