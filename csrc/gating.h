// attnkern CPU kernels of the pooled-gating primitives (CBAM, SE, BAM).
// The math of each is in attnkern/reference/gating.py; the contract (layouts, dtypes,
// accumulation dtype, optional arguments) in attnkern/ops/gating.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace attnkern {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

std::tuple<Tensor, Tensor, Tensor> channel_stats(const Tensor& x);
std::tuple<Tensor, Tensor, Tensor> spatial_stats(const Tensor& x, const Tensor& gc);
Tensor gate_apply(const Tensor& x, const OptTensor& gc, const OptTensor& gs);
std::tuple<OptTensor, OptTensor> gate_bwd_a(const Tensor& dout, const Tensor& x,
                                            const OptTensor& gc, const OptTensor& gs,
                                            bool need_dgc, bool need_dgs);
Tensor cbam_bwd_b(const Tensor& x, const Tensor& gc, const Tensor& smax, const Tensor& scount,
                  const Tensor& dsmean, const Tensor& dsmax);
Tensor gate_bwd_c(const Tensor& x, const OptTensor& dout, const OptTensor& gc,
                  const OptTensor& gs, const OptTensor& smax, const OptTensor& scount,
                  const OptTensor& dsmean, const OptTensor& dsmax, const OptTensor& cmax,
                  const OptTensor& ccount, const OptTensor& dcmean, const OptTensor& dcmax);
Tensor bam_combine(const Tensor& x, const Tensor& mc, const Tensor& ms, bool product);
std::tuple<Tensor, Tensor> bam_combine_bwd(const Tensor& dout, const Tensor& x,
                                           const Tensor& mc, const Tensor& ms, bool product);
Tensor bam_dx(const Tensor& x, const OptTensor& dout, const Tensor& mc, const Tensor& ms,
              bool product, const OptTensor& dcmean);

}  // namespace attnkern
