"""Builds attnkern and its C++ CPU extension (``attnkern._C``) from csrc/.

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the
torch that is already installed (build isolation would fetch another one).
"""
import glob
import os

from setuptools import setup

from torch.utils.cpp_extension import BuildExtension, CppExtension


def cpu_flags():
    """-O3 and OpenMP; the machine's vector ISA unless ATTNKERN_PORTABLE=1 (the extension is
    built on the machine that runs it; at::vec picks AVX-512 or AVX2 from these flags)."""
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("ATTNKERN_PORTABLE", "0") in ("", "0"):
        flags.append("-march=native")
    return flags


ext_modules = [
    CppExtension(
        name="attnkern._C",
        sources=sorted(glob.glob("csrc/*.cpp")),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cpu_flags()},
        extra_link_args=["-fopenmp"],
    )
]

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
