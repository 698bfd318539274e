"""Backend choice, in one place.

CUDA tensors go to Triton, CPU tensors to the C++ extension, and anything a backend does not
support to the pure-PyTorch reference (never a silent wrong answer). ``ATTNKERN_BACKEND``
(``triton``, ``cpu`` or ``reference``) forces one; a forced backend that cannot run raises.
Under ``TRITON_INTERPRET=1`` the Triton backend also runs on CPU tensors (that is how the
Triton kernels are tested without a GPU).

While a model is being exported (``torch.export.export``, ``torch.onnx.export`` in either mode,
``torch.jit.trace``) the ops run the reference unless a backend is forced: the exported graph
then holds only standard ATen ops, so it runs, saves, loads and converts to ONNX without
attnkern, instead of carrying our custom ops with the backend chosen at export time baked in.

While ``torch.compile`` traces a model, the gating blocks (CBAM, SE, BAM) hand the compiler
their reference math on CPU tensors unless a backend is forced: inductor then fuses the
block's passes with its neighbours (the BatchNorm that produces x, the residual add and the
activation after it), which opaque kernels prevent; on CPU that compiled graph is faster than
one calling our kernels (``benchmarks/test_bench_models.py``). On CUDA the Triton kernels stay.
CBAM's spatial convolution (``attnkern.ops.spatial_conv``) keeps its C++ kernel under ``auto``:
a convolution is an opaque call in the compiled graph either way.
``ATTNKERN_COMPILE=kernels`` keeps the kernels under ``torch.compile`` everywhere,
``ATTNKERN_COMPILE=decompose`` hands over the math everywhere (default ``auto``: as above).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

BACKENDS = ("triton", "cpu", "reference")
COMPILE_POLICIES = ("auto", "kernels", "decompose")
_warned = set()


def forced() -> Optional[str]:
    v = os.environ.get("ATTNKERN_BACKEND", "").strip().lower()
    if not v or v == "auto":
        return None
    if v not in BACKENDS:
        raise ValueError(f"ATTNKERN_BACKEND must be one of {BACKENDS} or 'auto', got {v!r}")
    return v


def compile_policy() -> str:
    """``ATTNKERN_COMPILE``: what the gating blocks give ``torch.compile`` (see the module doc)."""
    v = os.environ.get("ATTNKERN_COMPILE", "").strip().lower() or "auto"
    if v not in COMPILE_POLICIES:
        raise ValueError(f"ATTNKERN_COMPILE must be one of {COMPILE_POLICIES}, got {v!r}")
    return v


def decompose_for_compiler(device: torch.device) -> bool:
    """True while ``torch.compile`` (not an exporter) traces and the policy hands the gating
    blocks' reference math to the compiler for tensors on ``device``."""
    if not torch.compiler.is_compiling() or exporting():
        return False
    policy = compile_policy()
    return policy == "decompose" or (policy == "auto" and device.type == "cpu")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _why_not(backend: str, device: torch.device, extension: bool = True) -> Optional[str]:
    """None if ``backend`` can run on tensors of ``device``, else the reason it cannot.
    ``extension=False``: the op's cpu backend is ATen's own kernel, not attnkern's C++."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend takes CPU tensors, got {device.type} tensors"
        if not extension:
            return None
        from . import _cpu

        if _cpu.extension() is None:
            return f"the C++ extension is not available ({_cpu.load_error()})"
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return (f"the triton backend takes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got {device.type} tensors")
    raise ValueError(backend)


def exporting() -> bool:
    """True while torch.export / the dynamo ONNX exporter traces (``torch.compiler.is_exporting``)
    or ``torch.jit.trace`` / the TorchScript ONNX exporter records (``torch.jit.is_tracing``)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if is_exporting is not None and is_exporting():
        return True
    return torch.jit.is_tracing()


def pick(op: str, device: torch.device, supports: Optional[Callable[[str], Optional[str]]] = None,
         extension: bool = True, decomposable: bool = False) -> str:
    """The backend that runs ``op`` on tensors of ``device``.

    ``supports(backend)`` returns None when the op's kernels on that backend handle these
    particular inputs, or a reason when they do not (a dtype, a head dim...); the reference
    then runs instead, or, when the backend was forced, a RuntimeError names the reason.
    ``extension=False`` for ops whose cpu backend is ATen's (scaled dot-product attention).
    While exporting (:func:`exporting`) our kernels give way to the reference unless a backend
    is forced (an ATen kernel, ``extension=False`` on CPU, exports as it is); so they do for a
    ``decomposable`` op while ``torch.compile`` traces, by :func:`decompose_for_compiler`.
    """
    f = forced()
    if f is None and exporting() and not (device.type == "cpu" and not extension):
        return "reference"
    if f is None and decomposable and decompose_for_compiler(device):
        return "reference"
    if f is not None:
        why = _why_not(f, device, extension) or (supports(f) if supports else None)
        if why:
            raise RuntimeError(f"attnkern.{op}: ATTNKERN_BACKEND={f} cannot run here: {why}")
        return f
    preferred = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "reference"
    why = _why_not(preferred, device, extension) if preferred != "reference" else None
    if why is None and supports is not None and preferred != "reference":
        why = supports(preferred)
    if why is None:
        return preferred
    key = (op, preferred, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"attnkern.{op}: using the PyTorch reference because {why}", RuntimeWarning, stacklevel=3)
    return "reference"
