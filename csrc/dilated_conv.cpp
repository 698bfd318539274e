// BAM's dilated convolutions (Park et al., 2018, section 3, "spatial attention branch"): the
// k x k "same" convolution with dilation d of a narrow map x [B, C, H, W] to C_out channels,
// with an optional bias:
//
//   out[b, o, y, x] = bias[o] + sum over c < C, i, j < k of w[o, c, i, j] * x[b, c, y + d i - p, x + d j - p]
//
// with p = d * (k / 2) and zeros outside the map: dilated_conv, and dilated_conv_backward (the
// gradients of x, w and the bias).
//
// BAM's spatial branch runs two of them (3x3, d = 4) at C / 16 channels. oneDNN runs them at a
// few GMAC/s when that width is small: 9.3 ms a call for 32x4x112x112 NCHW maps (6 GMAC/s), a
// third of the whole fused BAM forward at 32x64x112x112, and its NCHW backward takes 29.5 ms.
// The direct correlation of csrc/correlate.h runs them instead.
#include "correlate.h"

namespace attnkern {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per vector ISA (cpu_capability.h)
namespace {

// The checks both entries share: x [B, C, H, W] (any strides), w [C_out, C, k, k] with k odd,
// bias undefined or [C_out], dilation >= 1, on the CPU, of one floating dtype. Returns the window.
Window check_dilated_conv(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, int64_t dilation,
                          const char* fn) {
  TORCH_CHECK(x.defined() && weight.defined(), fn, ": x and weight must be defined");
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(weight.device().is_cpu(), fn, ": weight must be a CPU tensor, got ", weight.device());
  TORCH_CHECK(x.dim() == 4, fn, ": x must be [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, fn, ": x must not be empty, got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, fn,
              ": x must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(weight.scalar_type() == t, fn, ": weight must have x's dtype ", t, ", got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) > 0 && weight.size(1) == x.size(1) &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              fn, ": weight must be [C_out, C, k, k] with C = ", x.size(1), " (x's channels) and k odd, got shape ",
              weight.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu(), fn, ": bias must be a CPU tensor, got ", bias->device());
    TORCH_CHECK(bias->scalar_type() == t, fn, ": bias must have x's dtype ", t, ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), fn, ": bias must be [C_out] = [",
                weight.size(0), "], got shape ", bias->sizes());
  }
  TORCH_CHECK(dilation >= 1, fn, ": dilation must be >= 1, got ", dilation);
  return Window{weight.size(2), dilation};
}

// The bias in the accumulation dtype, or an undefined tensor.
template <typename A>
Tensor bias_of(const std::optional<Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return Tensor();
  return bias->to(c10::CppTypeToScalarType<A>::value).contiguous();
}

}  // namespace

// The checked entries.

Tensor dilated_conv(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, int64_t dilation) {
  static constexpr const char* fn = "attnkern::dilated_conv";
  const Window win = check_dilated_conv(x, weight, bias, dilation, fn);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), C_out = weight.size(0);
  Tensor out = at::empty({B, C_out, H, W}, x.options());
  ATTNKERN_DISPATCH(x, fn, [&] {
    const Tensor taps = taps_of<A>(weight, false), b = bias_of<A>(bias);
    correlate<scalar_t, A>(map_of<scalar_t>(x), C, taps.data_ptr<A>(), b.defined() ? b.data_ptr<A>() : nullptr, C_out,
                           win, B, H, W, out);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> dilated_conv_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                                         int64_t dilation, std::array<bool, 3> output_mask) {
  static constexpr const char* fn = "attnkern::dilated_conv_backward";
  const Window win = check_dilated_conv(x, weight, std::nullopt, dilation, fn);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), C_out = weight.size(0);
  TORCH_CHECK(grad_out.defined() && grad_out.device().is_cpu(), fn, ": grad_out must be a CPU tensor");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, C_out, H, W}), fn, ": grad_out must be [B, C_out, H, W] = [", B,
              ", ", C_out, ", ", H, ", ", W, "], got shape ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), fn, ": grad_out must have x's dtype ", x.scalar_type(),
              ", got ", grad_out.scalar_type());
  const auto [need_x, need_w, need_b] = output_mask;
  Tensor grad_x = need_x ? at::empty({B, C, H, W}, x.options()) : at::empty({0}, x.options());
  Tensor grad_w = need_w ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  Tensor grad_b = need_b ? at::empty({C_out}, weight.options()) : at::empty({0}, weight.options());
  ATTNKERN_DISPATCH(x, fn, [&] {
    if (need_x) {
      const Tensor taps = taps_of<A>(weight, true);
      correlate<scalar_t, A>(map_of<scalar_t>(grad_out), C_out, taps.data_ptr<A>(), nullptr, C, win, B, H, W, grad_x);
    }
    if (need_w || need_b) {
      const auto acc = c10::CppTypeToScalarType<A>::value;
      Tensor gw = at::empty({weight.numel()}, x.options().dtype(acc)), gb = at::empty({C_out}, x.options().dtype(acc));
      weight_grad<scalar_t, A>(map_of<scalar_t>(grad_out), C_out, map_of<scalar_t>(x), C, win, B, H, W, gw.data_ptr<A>(),
                               need_b ? gb.data_ptr<A>() : nullptr);
      if (need_w) grad_w.copy_(gw.view(weight.sizes()));
      if (need_b) grad_b.copy_(gb);
    }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace attnkern

// The schemas, the tables of the copies and the dispatcher's CPU kernels: once, in the
// baseline build.
#ifdef CPU_CAPABILITY_DEFAULT
ATTNKERN_CPU_KERNEL(dilated_conv)
ATTNKERN_CPU_KERNEL(dilated_conv_backward)
TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def("dilated_conv(Tensor x, Tensor weight, Tensor? bias, int dilation) -> Tensor");
  m.def("dilated_conv_backward(Tensor grad_out, Tensor x, Tensor weight, int dilation, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("dilated_conv", ATTNKERN_ACTIVE_CPU_KERNEL(dilated_conv));
  m.impl("dilated_conv_backward", ATTNKERN_ACTIVE_CPU_KERNEL(dilated_conv_backward));
}
#endif  // CPU_CAPABILITY_DEFAULT
