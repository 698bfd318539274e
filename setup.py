"""Builds attnkern and its C++ CPU kernels (``attnkern/_C*.so``, a library of ``attnkern::`` ops
registered with PyTorch's dispatcher, loaded by attnkern/_cpu.py) from csrc/.

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the
torch that is already installed (build isolation would fetch another one).
"""
import glob
import os

from setuptools import setup

from torch.utils.cpp_extension import BuildExtension, CppExtension


def _cpu_isa():
    """The widest vector ISA of this machine that ATen's at::vec supports: 'avx512', 'avx2'
    or None. The extension is built where it runs (ATTNKERN_PORTABLE=1 builds without it)."""
    if os.environ.get("ATTNKERN_PORTABLE", "0") not in ("", "0"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= set(flags):
        return "avx512"
    if {"avx2", "fma", "f16c"} <= set(flags):
        return "avx2"
    return None


def cpu_flags():
    """-O3 and OpenMP, and at::vec's vector width: CPU_CAPABILITY_AVX512 or _AVX2 with the
    matching -m flags (what ATen's own kernels are compiled with)."""
    flags = ["-O3", "-fopenmp", "-std=c++20"]
    isa = _cpu_isa()
    if isa == "avx512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                  "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif isa == "avx2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


ext_modules = [
    CppExtension(
        name="attnkern._C",
        sources=sorted(glob.glob("csrc/*.cpp")),
        include_dirs=[os.path.abspath("csrc")],
        depends=sorted(glob.glob("csrc/*.h")),
        extra_compile_args={"cxx": cpu_flags()},
        extra_link_args=["-fopenmp"],
    )
]

if __name__ != "attnkern_flags":  # CMakeLists.txt runs this file only to read cpu_flags()
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
