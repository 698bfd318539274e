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
// 32x2x112x112 map, against 18 ms for the whole fused CBAM forward at 32x64x112x112. Here
// a task (an image's block of kRowBlock output rows) copies the rows it reads into a
// zero-padded buffer in the accumulation dtype, which turns the padding into plain loads; each
// output vector (pixels along a row) then takes one multiply-add per tap from unaligned loads
// of that buffer. The input gradient is the same correlation with the taps flipped (one input
// channel, two outputs); the weight's gradient is one dot product per tap, per task, summed
// over the tasks in order (deterministic, as every kernel here).
#include <vector>

#include "common.h"

namespace attnkern {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per vector ISA (cpu_capability.h)
namespace {

constexpr int64_t kRowBlock = 16;  // output rows per task
constexpr int kVecBlock = 4;   // output vectors that share a tap's weight broadcast

// A [B, N, H, W] map read through its strides (any layout).
template <typename T>
struct Map {
  const T* data;
  int64_t sb, sc, sh, sw;
  inline T at(int64_t b, int64_t c, int64_t y, int64_t x) const { return data[b * sb + c * sc + y * sh + x * sw]; }
};

template <typename T>
Map<T> map_of(const Tensor& t) {
  return Map<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// width of a padded row for W output columns and padding p: the last vector block's loads end
// inside it
inline int64_t padded_width(int64_t W, int64_t p, int64_t L) { return ceil_div(W, L) * L + 2 * p; }

// Copies rows y0 - p .. y0 + rows + p - 1 of the n channels of image b of `in` into buf (see
// correlate_rows), zeros outside the map; a row holds columns -p .. W + p - 1, then zeros up
// to `width`.
template <typename T, typename A>
void pad_rows(const Map<T>& in, int64_t b, int64_t n, int64_t H, int64_t W, int64_t y0, int64_t rows, int64_t p,
              int64_t width, std::vector<A>& buf) {
  const int64_t R = rows + 2 * p;
  buf.assign(n * R * width, A(0));
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t y = y0 - p + r;
      if (y < 0 || y >= H) continue;
      A* dst = buf.data() + (c * R + r) * width + p;
      for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<A>(in.at(b, c, y, x));
    }
  }
}

// line[col .. col + NV * L) for padded row r of output channel o: NV output vectors, one
// multiply-add per tap each (the tap's broadcast shared by the NV vectors).
template <int NV, typename A>
inline void correlate_vectors(const A* buf, int64_t n_in, int64_t R, int64_t width, const A* taps_o, int64_t k,
                              int64_t r, int64_t col, A* line) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  V acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = V(0);
  for (int64_t c = 0; c < n_in; ++c) {
    for (int64_t i = 0; i < k; ++i) {
      const A* src = buf + (c * R + r + i) * width + col;
      const A* ti = taps_o + (c * k + i) * k;
      for (int64_t j = 0; j < k; ++j) {
        const V wv(ti[j]);
        for (int u = 0; u < NV; ++u) acc[u] = at::vec::fmadd(wv, V::loadu(src + u * L + j), acc[u]);
      }
    }
  }
  for (int u = 0; u < NV; ++u) acc[u].store(line + col + u * L);
}

// out[b, o, y, :] for the task's rows y0 .. y0 + rows - 1 and every output channel o < n_out:
// the correlation of the padded rows (n_in channels) with taps[o][c][i * k + j], written through
// the output's strides as T.
template <typename T, typename A>
void correlate_rows(const std::vector<A>& buf, int64_t n_in, int64_t rows, int64_t width, const A* taps,
                    int64_t n_out, int64_t k, int64_t W, T* out, int64_t ob, int64_t oc, int64_t oh, int64_t ow,
                    int64_t b, int64_t y0) {
  constexpr int64_t L = Vectorized<A>::size();
  const int64_t R = rows + k - 1;
  const int64_t nvec = ceil_div(W, L);
  std::vector<A> line(nvec * L);
  for (int64_t o = 0; o < n_out; ++o) {
    const A* taps_o = taps + o * n_in * k * k;
    for (int64_t r = 0; r < rows; ++r) {
      int64_t v = 0;
      for (; v + kVecBlock <= nvec; v += kVecBlock)
        correlate_vectors<kVecBlock, A>(buf.data(), n_in, R, width, taps_o, k, r, v * L, line.data());
      for (; v < nvec; ++v) correlate_vectors<1, A>(buf.data(), n_in, R, width, taps_o, k, r, v * L, line.data());
      T* dst = out + b * ob + o * oc + (y0 + r) * oh;
      for (int64_t x = 0; x < W; ++x) dst[x * ow] = static_cast<T>(line[x]);
    }
  }
}

// The tasks: (image, block of kRowBlock rows), a fixed split that depends on the shape only.
struct Tasks {
  int64_t B, H, blocks;
  explicit Tasks(int64_t B_, int64_t H_) : B(B_), H(H_), blocks(ceil_div(H_, kRowBlock)) {}
  int64_t count() const { return B * blocks; }
  int64_t image(int64_t t) const { return t / blocks; }
  int64_t first_row(int64_t t) const { return (t % blocks) * kRowBlock; }
  int64_t rows(int64_t t) const { return std::min(kRowBlock, H - first_row(t)); }
};

// out = correlate(in, taps) over every task (see correlate_rows).
template <typename T, typename A>
void correlate(const Map<T>& in, int64_t n_in, const A* taps, int64_t n_out, int64_t k, int64_t B, int64_t H,
               int64_t W, Tensor& out) {
  constexpr int64_t L = Vectorized<A>::size();
  const int64_t p = k / 2, width = padded_width(W, p, L);
  const Tasks tasks(B, H);
  T* o = out.data_ptr<T>();
  const int64_t ob = out.stride(0), oc = out.stride(1), oh = out.stride(2), ow = out.stride(3);
  at::parallel_for(0, tasks.count(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> buf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = tasks.image(t), y0 = tasks.first_row(t), rows = tasks.rows(t);
      pad_rows<T, A>(in, b, n_in, H, W, y0, rows, p, width, buf);
      correlate_rows<T, A>(buf, n_in, rows, width, taps, n_out, k, W, o, ob, oc, oh, ow, b, y0);
    }
  });
}

// grad_w[0, c, i, j] = sum over b, y, x of g[b, 0, y, x] * s[b, c, y + i - p, x + j - p]: per task,
// one vector dot product per tap over the task's rows (g's rows zero past column W, so the
// padded lanes add nothing), lanes summed, then the tasks' partials summed in task order.
template <typename T, typename A>
void weight_grad(const Map<T>& g, const Map<T>& s, int64_t k, int64_t B, int64_t H, int64_t W, A* grad_w) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t p = k / 2, width = padded_width(W, p, L), nvec = ceil_div(W, L), taps = 2 * k * k;
  const Tasks tasks(B, H);
  std::vector<A> partial(tasks.count() * taps);
  at::parallel_for(0, tasks.count(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> sbuf, gbuf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = tasks.image(t), y0 = tasks.first_row(t), rows = tasks.rows(t), R = rows + 2 * p;
      pad_rows<T, A>(s, b, 2, H, W, y0, rows, p, width, sbuf);
      pad_rows<T, A>(g, b, 1, H, W, y0, rows, 0, nvec * L, gbuf);
      A* out = partial.data() + t * taps;
      for (int64_t c = 0; c < 2; ++c) {
        for (int64_t i = 0; i < k; ++i) {
          for (int64_t j = 0; j < k; ++j) {
            V acc0(0), acc1(0);
            for (int64_t r = 0; r < rows; ++r) {
              const A* gr = gbuf.data() + r * nvec * L;
              const A* sr = sbuf.data() + (c * R + r + i) * width + j;
              int64_t v = 0;
              for (; v + 2 <= nvec; v += 2) {
                acc0 = at::vec::fmadd(V::loadu(gr + v * L), V::loadu(sr + v * L), acc0);
                acc1 = at::vec::fmadd(V::loadu(gr + (v + 1) * L), V::loadu(sr + (v + 1) * L), acc1);
              }
              if (v < nvec) acc0 = at::vec::fmadd(V::loadu(gr + v * L), V::loadu(sr + v * L), acc0);
            }
            out[(c * k + i) * k + j] = sum_lanes(acc0 + acc1);
          }
        }
      }
    }
  });
  std::fill_n(grad_w, taps, A(0));
  for (int64_t t = 0; t < tasks.count(); ++t)
    for (int64_t q = 0; q < taps; ++q) grad_w[q] += partial[t * taps + q];
}

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

// The taps of w [1, 2, k, k] in the accumulation dtype, flipped (i, j -> k-1-i, k-1-j) or not.
template <typename A>
std::vector<A> taps_of(const Tensor& weight, bool flipped) {
  const int64_t k = weight.size(2);
  const Tensor w = weight.to(c10::CppTypeToScalarType<A>::value).contiguous();
  const A* src = w.data_ptr<A>();
  std::vector<A> taps(2 * k * k);
  for (int64_t c = 0; c < 2; ++c)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j)
        taps[(c * k + i) * k + j] = flipped ? src[(c * k + (k - 1 - i)) * k + (k - 1 - j)] : src[(c * k + i) * k + j];
  return taps;
}

}  // namespace

// The checked entries.

Tensor spatial_conv(const Tensor& s, const Tensor& weight) {
  static constexpr const char* fn = "attnkern::spatial_conv";
  const int64_t k = check_conv(s, weight, fn);
  const int64_t B = s.size(0), H = s.size(2), W = s.size(3);
  Tensor out = at::empty({B, 1, H, W}, s.options());
  ATTNKERN_DISPATCH(s, fn, [&] {
    const std::vector<A> taps = taps_of<A>(weight, false);
    correlate<scalar_t, A>(map_of<scalar_t>(s), 2, taps.data(), 1, k, B, H, W, out);
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
      const std::vector<A> taps = taps_of<A>(weight, true);
      correlate<scalar_t, A>(map_of<scalar_t>(grad_out), 1, taps.data(), 2, k, B, H, W, grad_s);
    }
    if (need_grad_weight) {
      std::vector<A> gw(2 * k * k);
      weight_grad<scalar_t, A>(map_of<scalar_t>(grad_out), map_of<scalar_t>(s), k, B, H, W, gw.data());
      scalar_t* dst = grad_w.data_ptr<scalar_t>();
      for (int64_t q = 0; q < 2 * k * k; ++q) dst[q] = static_cast<scalar_t>(gw[q]);
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
