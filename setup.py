"""Builds attnkern and its C++ CPU kernels (``attnkern/_C*.so``, a library of ``attnkern::`` ops
registered with PyTorch's dispatcher, loaded by attnkern/_cpu.py) from csrc/.

Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the
torch that is already installed (build isolation would fetch another one).
"""
import glob
import os
import platform

from setuptools import setup

from torch.utils.cpp_extension import BuildExtension, CppExtension


# The vector ISAs every kernel source is compiled for besides the baseline, with the flags
# ATen compiles its own kernels with for the same at::vec width (csrc/cpu_capability.h chooses
# among the copies at run time, so one build runs on any x86-64 CPU). AVX512_BF16 is the
# AVX512 copy with the AVX512_BF16 instructions (Cooper Lake, Sapphire Rapids and later Xeons,
# AMD Zen 4 and later): one instruction rounds 32 floats to bfloat16, where AVX-512 alone
# takes 16.
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
VECTOR_CAPABILITIES = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": _AVX512,
    "AVX512_BF16": _AVX512 + ["-mavx512bf16"],
}
# The at::vec width of a copy, where its name is not that width's CPU_CAPABILITY_<NAME> macro.
VECTOR_WIDTH = {"AVX512_BF16": "AVX512"}
# Built once, for the baseline: csrc/cpu_capability.cpp (the choice itself) and
# csrc/output_cache.cpp (one cache of output blocks that every copy shares).
BUILT_ONCE = ("cpu_capability.cpp", "output_cache.cpp")
KERNEL_SOURCES = sorted(f for f in glob.glob("csrc/*.cpp") if os.path.basename(f) not in BUILT_ONCE)


def base_flags():
    """The flags of every object: -O3, OpenMP, C++20 (no -march: the baseline is plain x86-64)."""
    return ["-O3", "-fopenmp", "-std=c++20"]


def capability_flags(name):
    """The flags that make an object the `name` copy of the kernels ('DEFAULT', 'AVX2', 'AVX512',
    'AVX512_BF16'): at::vec's CPU_CAPABILITY macros (the copy's namespace, and its at::vec width)
    and the ISA's -m flags."""
    width = [f"-DCPU_CAPABILITY_{VECTOR_WIDTH[name]}"] if name in VECTOR_WIDTH else []
    return [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"] + width + VECTOR_CAPABILITIES.get(name, [])


def vector_capabilities():
    """The vector copies this build makes: all of VECTOR_CAPABILITIES on x86-64, none elsewhere."""
    return list(VECTOR_CAPABILITIES) if platform.machine().lower() in ("x86_64", "amd64") else []


class BuildExtensionPerCapability(BuildExtension):
    """torch's BuildExtension that also compiles the kernel sources once per vector capability
    (into build_temp/<capability>/) and links those objects after the baseline ones, DEFAULT,
    AVX2, AVX512, AVX512_BF16 in that order (see csrc/cpu_capability.h for why the order matters)."""

    def build_extension(self, ext):
        baseline = [f for f in ext.extra_compile_args["cxx"] if not f.startswith("-DCPU_CAPABILITY")]
        objects = []
        for name in vector_capabilities():
            objects += self.compiler.compile(
                KERNEL_SOURCES,
                output_dir=os.path.join(self.build_temp, name.lower()),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": baseline + capability_flags(name)},
                depends=ext.depends,
            )
        ext.extra_objects = objects
        super().build_extension(ext)


ext_modules = [
    CppExtension(
        name="attnkern._C",
        sources=sorted(glob.glob("csrc/*.cpp")),
        include_dirs=[os.path.abspath("csrc")],
        depends=sorted(glob.glob("csrc/*.h")),
        extra_compile_args={"cxx": base_flags() + capability_flags("DEFAULT")},
        extra_link_args=["-fopenmp"],
    )
]

if __name__ != "attnkern_flags":  # CMakeLists.txt runs this file only to read the flags
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtensionPerCapability.with_options(use_ninja=True)},
    )
