// The vector ISAs the CPU kernels are built for, and the choice among them at run time (what
// ATen's DispatchStub does for its own kernels).
//
// setup.py compiles every kernel source once per capability: DEFAULT (the x86-64 baseline, or
// any other CPU), AVX2 (with FMA and F16C), AVX512 (F, BW, VL and DQ) and AVX512_BF16 (AVX512
// and the BF16 conversions: the AVX512 copy whose bfloat16 stores round 32 floats in one
// instruction), each with its own -m flags and its CPU_CAPABILITY / CPU_CAPABILITY_<NAME>
// macros, which select at::vec's Vectorized width (AVX512_BF16 also defines
// CPU_CAPABILITY_AVX512: the same width, and every AVX512 code path). Everything a kernel
// source defines lives in the inline namespace attnkern::cpu::CPU_CAPABILITY (as at::vec does),
// so the copies share no symbol of ours. Each op's table holds its checked entry's copies
// (ATTNKERN_CPU_KERNEL); the dispatcher calls the table (ATTNKERN_ACTIVE_CPU_KERNEL), which runs
// the copy for the active capability.
//
// The active capability is the widest one that this CPU runs (CPUID, and XGETBV for the OS's
// support of the wider registers), lowered by ATTNKERN_CPU_CAPABILITY or,
// when that is unset, by ATen's ATEN_CPU_CAPABILITY (default, avx2 or avx512, any case). It is
// read on first use; attnkern::_set_cpu_capability changes it at run time (tests run the
// kernels under each capability in one process).
//
// Inline functions of other headers (c10, the standard library) are compiled in every copy
// under the same name, and the linker keeps the first one it sees: setup.py and CMakeLists.txt
// link the DEFAULT objects first, then AVX2, AVX512 and AVX512_BF16, so the copy kept of such a
// function is never built for a wider ISA than any of its callers.
#pragma once

#ifndef CPU_CAPABILITY
#error "compile attnkern's kernels with -DCPU_CAPABILITY=DEFAULT, AVX2, AVX512 or AVX512_BF16"
#endif

#include <c10/util/Exception.h>

#include <type_traits>
#include <utility>

namespace attnkern {
namespace cpu {

enum class Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };
constexpr int kCapabilities = 4;

// The capability whose kernels run now (cpu_capability.cpp).
Capability active_capability();

// One op's entry as compiled for each capability (null where not built); `active()` is the
// one to run.
template <typename Fn>
struct KernelTable;

template <typename R, typename... Args>
struct KernelTable<R(Args...)> {
  using Fn = R(Args...);
  Fn* by_capability[kCapabilities];

  Fn* active() const {
    for (int c = static_cast<int>(active_capability()); c >= 0; --c) {
      if (by_capability[c] != nullptr) return by_capability[c];
    }
    TORCH_CHECK(false, "attnkern: this op has no CPU kernel in the library");
  }
};

// A plain function with the op's signature that calls the active copy (what the dispatcher
// registers).
template <auto* table, typename Fn = typename std::remove_pointer_t<decltype(table)>::Fn>
struct ActiveKernel;

template <auto* table, typename R, typename... Args>
struct ActiveKernel<table, R(Args...)> {
  static R call(Args... args) { return table->active()(std::forward<Args>(args)...); }
};

}  // namespace cpu
}  // namespace attnkern

// In the baseline build of a kernel source, after its entry attnkern::cpu::<name>: the table
// `<name>_kernels` of its copies. The vector copies are weak references, null where a copy is
// not built (not x86-64); the table is filled by the linker, so the vector objects run no code
// when the library loads (it must load on any CPU).
#define ATTNKERN_CPU_KERNEL(name)                                                        \
  namespace attnkern {                                                                   \
  namespace cpu {                                                                        \
  namespace AVX2 {                                                                       \
  [[gnu::weak]] decltype(DEFAULT::name) name;                                            \
  }                                                                                      \
  namespace AVX512 {                                                                     \
  [[gnu::weak]] decltype(DEFAULT::name) name;                                            \
  }                                                                                      \
  namespace AVX512_BF16 {                                                                \
  [[gnu::weak]] decltype(DEFAULT::name) name;                                            \
  }                                                                                      \
  constinit const KernelTable<decltype(DEFAULT::name)> name##_kernels{                   \
      {&DEFAULT::name, &AVX2::name, &AVX512::name, &AVX512_BF16::name}};                 \
  }                                                                                      \
  }

// The function to register with the dispatcher for <name>: runs the active capability's copy.
#define ATTNKERN_ACTIVE_CPU_KERNEL(name) \
  (&::attnkern::cpu::ActiveKernel<&::attnkern::cpu::name##_kernels>::call)
