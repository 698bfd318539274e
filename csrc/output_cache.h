// Big outputs of the CPU kernels (gate_apply's out, the input gradients dx) from a cache of
// freed blocks: on CPU, a fresh tensor of a few MB or more is faulted in page by page on its
// first write, which cost as much as the pass itself (glibc maps large blocks on allocation
// and unmaps them on free). A block freed by its tensor goes back to the cache, still mapped,
// and the next output of the same size takes it. The cache holds at most
// ATTNKERN_CPU_OUTPUT_CACHE_MB of idle blocks (read once, at the first big output; 0 turns it
// off), oldest evicted first. One instance per process: this file is built once, not per ISA.
#pragma once

#include <ATen/ATen.h>

namespace attnkern {
namespace cpu {

// An uninitialised tensor of x's sizes, strides and dtype on the CPU (x dense: NCHW- or
// channels_last-contiguous), from the cache when it is at least kMinCachedBytes.
at::Tensor empty_output_like(const at::Tensor& x);

}  // namespace cpu
}  // namespace attnkern
