// Scratch buffers of the kernel sources: uninitialised CPU tensors, not std::vector.
//
// A kernel source is compiled once per vector ISA (cpu_capability.h), and the compiler may emit
// an out-of-line copy of an inline standard-library function it calls (std::vector's sized
// constructor, as a local clone, say) built for that ISA but named as a plain std:: function;
// tests/cpu/test_cpu_capability.py then cannot tell it from a baseline function, and rightly
// refuses any such copy holding vector instructions. at::empty is one out-of-line call into
// libtorch, and the kernels zero what they need zeroed with memset.
#pragma once

#include <cstring>

#include <ATen/ATen.h>

namespace attnkern {
namespace cpu {

// n elements of A, uninitialised; reused while they fit.
template <typename A>
class Scratch {
 public:
  A* get(int64_t n) {
    if (!t_.defined() || t_.numel() < n)
      t_ = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
    return t_.template data_ptr<A>();
  }
  // n elements of A, all zero
  A* zeros(int64_t n) {
    A* p = get(n);
    std::memset(static_cast<void*>(p), 0, static_cast<size_t>(n) * sizeof(A));
    return p;
  }

 private:
  at::Tensor t_;
};

}  // namespace cpu
}  // namespace attnkern
