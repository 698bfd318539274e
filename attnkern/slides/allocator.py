"""The memory-allocator policy of ``attnkern profile``: one for every variant of a run.

On a CPU, a fresh tensor of tens of MB costs more in page faults than in memory bandwidth:
glibc's malloc hands large blocks to ``mmap`` and gives them back on free, so every new
activation or gradient is faulted in again, page by page. PyTorch's own CPU launcher
(``torch.backends.xeon.run_cpu``) preloads jemalloc or tcmalloc for that reason. The policy
``auto`` does the same, in this order:

1. jemalloc or tcmalloc already loaded in the process (``LD_PRELOAD``): kept;
2. else, where the system has one (``ctypes.util.find_library``), the command runs itself again
   with it in ``LD_PRELOAD`` (:func:`preload_rerun`, before any big allocation);
3. else, with glibc: ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, 2 GiB)``, set
   before the model is built: large blocks come from the heap and freed ones are reused
   instead of being unmapped (the ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` tunables);
4. else nothing.

``off`` leaves the C library's allocator as it is. The report names what ran.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import Dict, List, Optional, Tuple

POLICIES = ("auto", "off")
CACHING = ("jemalloc", "tcmalloc")
_RERUN_MARK = "ATTNKERN_ALLOCATOR_PRELOADED"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2 ** 31 - 1  # the largest value mallopt's int takes: about 2 GiB


def loaded_caching_allocator() -> Optional[str]:
    """'jemalloc' or 'tcmalloc' if one is mapped into this process, else None."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    return next((name for name in CACHING if f"lib{name}" in maps), None)


def find_caching_allocator() -> Optional[str]:
    """The shared library of jemalloc or tcmalloc on this system (a name ``LD_PRELOAD`` takes),
    or None."""
    for name in CACHING:
        lib = ctypes.util.find_library(name)
        if lib:
            return lib
    return None


def preload_rerun(policy: str, argv: List[str]) -> Optional[Tuple[List[str], Dict[str, str]]]:
    """Step 2 of ``auto``: the command line (``python -m attnkern`` + ``argv``) and environment
    that run this command again with jemalloc or tcmalloc in ``LD_PRELOAD``; None when one is
    loaded already, none is installed, this is the rerun, or the policy is not ``auto``."""
    if policy != "auto" or os.environ.get(_RERUN_MARK) or loaded_caching_allocator():
        return None
    lib = find_caching_allocator()
    if lib is None:
        return None
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[_RERUN_MARK] = "1"
    return [sys.executable, "-m", "attnkern", *argv], env


def apply(policy: str) -> str:
    """Apply ``policy`` in this process (steps 1, 3, 4 of ``auto``) and say what runs, for the
    report. Call it before the first big allocation."""
    if policy not in POLICIES:
        raise ValueError(f"allocator policy must be one of {POLICIES}, got {policy!r}")
    if policy == "off":
        return "the C library's malloc, untuned (--allocator off)"
    caching = loaded_caching_allocator()
    if caching:
        return f"{caching} (preloaded)"
    if platform.libc_ver()[0] != "glibc":
        return "the C library's malloc, untuned (not glibc, no jemalloc or tcmalloc found)"
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return "glibc malloc, untuned (mallopt refused)"
    return "glibc malloc tuned: no mmap for large blocks (M_MMAP_MAX=0), freed memory kept (M_TRIM_THRESHOLD=2 GiB)"
