"""Loads the C++ CPU kernels (``attnkern/_C*.so``). The one place that loads them.

The library registers the ``attnkern::`` gating ops with PyTorch's dispatcher (their schemas
and their CPU kernels, csrc/*.cpp); it has no Python module of its own, so it is
loaded with :func:`torch.ops.load_library`, and the kernels are called as
``torch.ops.attnkern.<op>`` on CPU tensors. ``ATTNKERN_EXTENSION_DIR`` loads the library from
another build instead (the sanitizer build of CMakeLists.txt: see scripts/sanitize.sh).
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Optional

_path: Optional[str] = None
_error: Optional[BaseException] = None
_tried = False


def _find() -> str:
    folder = os.environ.get("ATTNKERN_EXTENSION_DIR")
    where = folder or os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(where, "_C*.so")))
    if not found and not folder:  # an install that maps the module elsewhere (editable finders)
        spec = importlib.util.find_spec("attnkern._C")
        found = [spec.origin] if spec is not None and spec.origin else []
    if not found:
        origin = f"ATTNKERN_EXTENSION_DIR={folder}" if folder else where
        raise ImportError(f"no _C*.so in {origin}")
    return found[0]


def extension():
    """``torch.ops.attnkern`` once the C++ kernels are loaded, or None when they are not built
    or fail to load (see :func:`load_error`)."""
    global _path, _error, _tried
    import torch

    if not _tried:
        _tried = True
        try:
            path = _find()
            torch.ops.load_library(path)  # links against torch's libraries: import torch first
            _path = path
        except (ImportError, OSError, RuntimeError) as e:  # not built, or built for another torch
            _error = e
    return torch.ops.attnkern if _path is not None else None


def library_path() -> Optional[str]:
    """The file the C++ kernels were loaded from, or None."""
    extension()
    return _path


def load_error() -> Optional[BaseException]:
    extension()
    return _error


def require():
    """``torch.ops.attnkern`` with the C++ kernels loaded; a RuntimeError saying how to build
    them otherwise."""
    ext = extension()
    if ext is None:
        raise RuntimeError(
            "attnkern's C++ kernels are not built or failed to load "
            f"({_error}); build them with `pip install --no-build-isolation -e .` "
            "from the project root, or set ATTNKERN_BACKEND=reference"
        )
    return ext


def cpu_model() -> str:
    """This CPU's model name as /proc/cpuinfo gives it (every figure names the CPU it was
    measured on), else what :mod:`platform` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_capability() -> str:
    """The vector ISA whose copy of the C++ kernels runs: ``"DEFAULT"`` (the x86-64 baseline),
    ``"AVX2"``, ``"AVX512"`` or ``"AVX512_BF16"`` (AVX-512 with the BF16 conversions: its
    bfloat16 stores round in one instruction). The library holds one copy per ISA; the widest
    one this CPU runs is chosen on first use, lowered by ``ATTNKERN_CPU_CAPABILITY`` (``default``,
    ``avx2``, ``avx512``, ``avx512_bf16``) or, when that is unset, ``ATEN_CPU_CAPABILITY``
    (``default``, ``avx2``, ``avx512``: ATen's widest, which keeps ``AVX512_BF16``); a value
    this CPU cannot run falls back to the widest it can, with a warning. Raises RuntimeError when the kernels are
    not built, or when ``ATTNKERN_CPU_CAPABILITY`` names no capability."""
    return require().cpu_capability()


def cpu_capabilities() -> list:
    """The capabilities this CPU runs and this build has, narrowest first (``"DEFAULT"``
    always)."""
    return list(require().cpu_capabilities())


def set_cpu_capability(name: str) -> str:
    """Runs the C++ kernels' ``name`` copy from now on (``"default"``, ``"avx2"``, ``"avx512"``,
    ``"avx512_bf16"``, any case) and returns the capability active before. Raises RuntimeError
    for a name that is not one of :func:`cpu_capabilities`. For tests and measurements; users set
    ``ATTNKERN_CPU_CAPABILITY``."""
    return require()._set_cpu_capability(name)


def output_cache_info() -> dict:
    """The cache of big output blocks (the outputs of 1 MiB and more of ``gate_apply``,
    ``bam_combine`` and the input gradients): ``hits`` and ``misses`` (outputs that took a cached
    block, or a new one), ``cached_bytes`` and ``cached_blocks`` (idle blocks held now) and
    ``limit_bytes`` (``ATTNKERN_CPU_OUTPUT_CACHE_MB``, 512 MB by default; 0: off). A fresh tensor of
    that size is faulted in page by page on its first write, which costs about as much as the
    pass that writes it; a cached block is mapped already. Raises RuntimeError when the kernels
    are not built, or when ``ATTNKERN_CPU_OUTPUT_CACHE_MB`` is not a whole number >= 0."""
    hits, misses, cached_bytes, cached_blocks, limit = require()._output_cache_stats()
    return {"hits": hits, "misses": misses, "cached_bytes": cached_bytes, "cached_blocks": cached_blocks,
            "limit_bytes": limit}


def empty_output_cache() -> int:
    """Frees the idle blocks of the output cache (:func:`output_cache_info`), as
    ``torch.cuda.empty_cache`` does for CUDA's; returns the bytes freed. Blocks of live tensors
    return to the cache when those are freed."""
    return require()._empty_output_cache()


def set_output_cache_limit(mb: int) -> int:
    """Sets the most idle memory the output cache holds, in MB (0 turns it off; idle blocks
    above the new limit are freed, oldest first), and returns the limit before. For tests and
    measurements; users set ``ATTNKERN_CPU_OUTPUT_CACHE_MB``."""
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 0:
        raise ValueError(f"attnkern: the output cache limit must be a whole number of MB >= 0, got {mb!r}")
    return require()._set_output_cache_limit_mb(mb)
