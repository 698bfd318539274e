// CBAM's spatial-attention convolution (Woo et al., 2018, eq. 3): the k x k "same" convolution
// of the two pooled maps s = [mean_c; max_c] ([B, 2, H, W]) to one channel, no bias:
//
//   out[b, 0, y, x] = sum over c < 2, i, j < k of  w[0, c, i, j] * s[b, c, y + i - p, x + j - p]
//
// with p = k / 2 and zeros outside the map: spatial_conv, and spatial_conv_backward (the
// gradients of s and w).
//
// oneDNN runs this convolution, with its one output channel, at a few percent of the CPU's
// multiply-add rate: 4.5 ms forward and 7.7 ms backward (channels_last; 62 ms NCHW) for a
// 32x2x112x112 map, against 18 ms for the whole fused CBAM forward at 32x64x112x112. The
// direct correlation of csrc/correlate.h runs it instead: two input channels, one output.
#include "correlate.h"

namespace attnkern {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per vector ISA (cpu_capability.h)
namespace {

// The checks both entries share: s [B, 2, H, W] (any strides) and w [1, 2, k, k] with k odd, on
// the CPU, of one floating dtype. Returns k.
int64_t check_conv(const Tensor& s, const Tensor& weight, const char* fn) {
  TORCH_CHECK(s.defined() && weight.defined(), fn, ": s and weight must be defined");
  TORCH_CHECK(s.device().is_cpu(), fn, ": s must be a CPU tensor, got ", s.device());
  TORCH_CHECK(weight.device().is_cpu(), fn, ": weight must be a CPU tensor, got ", weight.device());
  TORCH_CHECK(s.dim() == 4 && s.size(1) == 2, fn, ": s must be [B, 2, H, W] (the two pooled maps), got shape ",
              s.sizes());
  TORCH_CHECK(s.numel() > 0, fn, ": s must not be empty, got shape ", s.sizes());
  const auto t = s.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, fn,
              ": s must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(weight.scalar_type() == t, fn, ": weight must have s's dtype ", t, ", got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == 2 && weight.size(2) == weight.size(3) &&
                  weight.size(2) % 2 == 1,
              fn, ": weight must be [1, 2, k, k] with k odd, got shape ", weight.sizes());
  return weight.size(2);
}

}  // namespace

// The checked entries.

Tensor spatial_conv(const Tensor& s, const Tensor& weight) {
  static constexpr const char* fn = "attnkern::spatial_conv";
  const int64_t k = check_conv(s, weight, fn);
  const int64_t B = s.size(0), H = s.size(2), W = s.size(3);
  Tensor out = at::empty({B, 1, H, W}, s.options());
  ATTNKERN_DISPATCH(s, fn, [&] {
    const Tensor taps = taps_of<A>(weight, false);
    correlate<scalar_t, A>(map_of<scalar_t>(s), 2, taps.data_ptr<A>(), nullptr, 1, Window{k, 1}, B, H, W, out);
  });
  return out;
}

std::tuple<Tensor, Tensor> spatial_conv_backward(const Tensor& grad_out, const Tensor& s, const Tensor& weight,
                                                 bool need_grad_s, bool need_grad_weight) {
  static constexpr const char* fn = "attnkern::spatial_conv_backward";
  const int64_t k = check_conv(s, weight, fn);
  const int64_t B = s.size(0), H = s.size(2), W = s.size(3);
  TORCH_CHECK(grad_out.defined() && grad_out.device().is_cpu(), fn, ": grad_out must be a CPU tensor");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, 1, H, W}), fn, ": grad_out must be [B, 1, H, W] = [", B,
              ", 1, ", H, ", ", W, "], got shape ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == s.scalar_type(), fn, ": grad_out must have s's dtype ", s.scalar_type(),
              ", got ", grad_out.scalar_type());
  Tensor grad_s = need_grad_s ? at::empty({B, 2, H, W}, s.options()) : at::empty({0}, s.options());
  Tensor grad_w = need_grad_weight ? at::empty({1, 2, k, k}, weight.options()) : at::empty({0}, weight.options());
  ATTNKERN_DISPATCH(s, fn, [&] {
    if (need_grad_s) {
      const Tensor taps = taps_of<A>(weight, true);
      correlate<scalar_t, A>(map_of<scalar_t>(grad_out), 1, taps.data_ptr<A>(), nullptr, 2, Window{k, 1}, B, H, W,
                              grad_s);
    }
    if (need_grad_weight) {
      Tensor gw = at::empty({1, 2, k, k}, s.options().dtype(c10::CppTypeToScalarType<A>::value));
      weight_grad<scalar_t, A>(map_of<scalar_t>(grad_out), 1, map_of<scalar_t>(s), 2, Window{k, 1}, B, H, W,
                               gw.data_ptr<A>(), nullptr);
      grad_w.copy_(gw);
    }
  });
  return {grad_s, grad_w};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace attnkern

// The schemas, the tables of the copies and the dispatcher's CPU kernels: once, in the
// baseline build.
#ifdef CPU_CAPABILITY_DEFAULT
ATTNKERN_CPU_KERNEL(spatial_conv)
ATTNKERN_CPU_KERNEL(spatial_conv_backward)
TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def("spatial_conv(Tensor s, Tensor weight) -> Tensor");
  m.def("spatial_conv_backward(Tensor grad_out, Tensor s, Tensor weight, bool need_grad_s, "
      "bool need_grad_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("spatial_conv", ATTNKERN_ACTIVE_CPU_KERNEL(spatial_conv));
  m.impl("spatial_conv_backward", ATTNKERN_ACTIVE_CPU_KERNEL(spatial_conv_backward));
}
#endif  // CPU_CAPABILITY_DEFAULT
