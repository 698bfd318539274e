// BAM's combine out = x * (1 + sigmoid(z)) with the logits z = mc[b, c] + ms[b, hw] (or
// mc * ms, the authors' released code): bam_combine, bam_combine_backward (the logits'
// gradients) and bam_input_grad (the block's input gradient, with the mean-pool term and,
// optionally, the input gradient of the 1x1 projection the spatial branch starts with, so that
// dx is written once instead of written, then read and written again by a matrix product).
#include "both_axes.h"
#include "common.h"
#include "output_cache.h"
#include "scratch.h"

namespace attnkern {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per vector ISA (cpu_capability.h)
namespace {

// The logits z for a vector along the contiguous axis, or for one element.
template <typename A>
struct BamLogits {
  using V = Vectorized<A>;
  const A* mc;  // [B, C]
  const A* ms;  // [B, HW]
  int64_t C, HW;
  bool product;
  // along_hw: the vector runs over pixels of one channel c (NCHW); else over channels of one
  // pixel hw (channels_last). `c` / `hw` is the vector's first index.
  inline V vec(int64_t b, int64_t c, int64_t hw, bool along_hw) const {
    V a, m;
    if (along_hw) {
      a = V(mc[b * C + c]);
      m = V::loadu(ms + b * HW + hw);
    } else {
      a = V::loadu(mc + b * C + c);
      m = V(ms[b * HW + hw]);
    }
    return product ? a * m : a + m;
  }
  inline A scalar(int64_t b, int64_t c, int64_t hw) const {
    return product ? mc[b * C + c] * ms[b * HW + hw] : mc[b * C + c] + ms[b * HW + hw];
  }
  // The logits of n elements along the contiguous axis from (b, c, hw), into z[0..n).
  inline void tail(int64_t b, int64_t c, int64_t hw, bool along_hw, int64_t n, A* z) const {
    for (int64_t j = 0; j < n; ++j) z[j] = along_hw ? scalar(b, c, hw + j) : scalar(b, c + j, hw);
  }
};

// The gate s = sigmoid(z) for a vector along the contiguous axis, or for a row's tail. With
// z = mc + ms, exp(-z) = exp(-mc) * exp(-ms): those two exps are taken once per [B, C] and
// [B, HW] entry (bam_gate), and a gate then costs a multiply, an add and a divide where it cost
// an exp per element, which bound the passes (the same time in bf16 as in float32). An image
// whose logits exceed kSeparableLogit in magnitude, where the product could overflow or lose
// precision to subnormals, or hold a NaN, takes the sigmoid of z per element. So does the
// product form z = mc * ms.
template <typename A>
struct BamGate {
  using V = Vectorized<A>;
  static constexpr double kSeparableLogit = 40;  // e^80 and e^-80 are normal floats
  BamLogits<A> z;
  const A* exp_neg_mc = nullptr;  // [B, C]; null: every image per element
  const A* exp_neg_ms = nullptr;  // [B, HW]
  const A* separable = nullptr;   // [B]: 1 where the image takes the split form
  inline bool split(int64_t b) const { return exp_neg_mc && separable[b] != A(0); }
  // 1 / (1 + e^-mc * e^-ms) from a channel factor and a pixel factor
  static inline V from_factors(const V& fc, const V& fs) { return V(1) / (V(1) + fc * fs); }
  inline V vec(int64_t b, int64_t c, int64_t hw, bool along_hw) const {
    if (!split(b)) return sigmoid(z.vec(b, c, hw, along_hw));
    if (along_hw) return from_factors(V(exp_neg_mc[b * z.C + c]), V::loadu(exp_neg_ms + b * z.HW + hw));
    return from_factors(V::loadu(exp_neg_mc + b * z.C + c), V(exp_neg_ms[b * z.HW + hw]));
  }
  // The gates of n < 2 * V::size() elements along the contiguous axis from (b, c, hw), into
  // s[0..n): the vector form on a padded copy, so that every element gets the same function.
  inline void tail(int64_t b, int64_t c, int64_t hw, bool along_hw, int64_t n, A* s) const {
    if (!split(b)) {
      z.tail(b, c, hw, along_hw, n, s);
      sigmoid_tail(s, n, s);
      return;
    }
    if (n <= 0) return;
    constexpr int64_t L = V::size();
    A f[2 * L], g[2 * L];
    for (int64_t j = 0; j < 2 * L; ++j) {
      const int64_t k = std::min(j, n - 1);  // padding repeats the last element
      f[j] = along_hw ? exp_neg_mc[b * z.C + c] : exp_neg_mc[b * z.C + c + k];
      g[j] = along_hw ? exp_neg_ms[b * z.HW + hw + k] : exp_neg_ms[b * z.HW + hw];
    }
    from_factors(V::loadu(f), V::loadu(g)).store(f);
    from_factors(V::loadu(f + L), V::loadu(g + L)).store(f + L);
    std::copy_n(f, n, s);
  }
};

// e^-m over m[0..n) into e, and whether every |m| <= bound (false with a NaN).
template <typename A>
inline bool exp_neg_within(const A* m, int64_t n, double bound, A* e) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  int64_t i = 0;
  for (; i + L <= n; i += L) V::loadu(m + i).neg().exp().store(e + i);
  for (; i < n; ++i) e[i] = std::exp(-m[i]);
  bool within = true;
  for (i = 0; i < n; ++i) within &= std::abs(m[i]) <= static_cast<A>(bound);
  return within;
}

// The gate of BAM's combine: the split form (BamGate) for the sum z = mc + ms, its factors kept
// in `scratch`.
template <typename A>
BamGate<A> bam_gate(const BamLogits<A>& z, int64_t B, Tensor& scratch) {
  BamGate<A> gate{z};
  if (z.product) return gate;
  const int64_t C = z.C, HW = z.HW;
  scratch = at::empty({B * (C + HW + 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
  A* fc = scratch.data_ptr<A>();
  A* fs = fc + B * C;
  A* split = fs + B * HW;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool channels = exp_neg_within(z.mc + b * C, C, gate.kSeparableLogit, fc + b * C);
      const bool pixels = exp_neg_within(z.ms + b * HW, HW, gate.kSeparableLogit, fs + b * HW);
      split[b] = channels && pixels ? A(1) : A(0);
    }
  });
  gate.exp_neg_mc = fc;
  gate.exp_neg_ms = fs;
  gate.separable = split;
  return gate;
}

// q = grad_out * x * s * (1 - s), s = sigmoid(z): the logits' gradient per element.
template <typename A>
struct BamLogitGrad {
  using V = Vectorized<A>;
  // the gate is read per element: a vector step past a row's end would read past its logits
  static constexpr bool kElementsOnly = false;
  BamGate<A> gate;
  inline V vec(const V& d, const V& x, int64_t b, int64_t c, int64_t hw, bool along_hw) const {
    const V s = gate.vec(b, c, hw, along_hw);
    return d * x * s * (V(1) - s);
  }
  template <typename T>
  inline void tail(const T* d, const T* x, int64_t n, int64_t b, int64_t c, int64_t hw, bool along_hw,
                   A* q) const {
    gate.tail(b, c, hw, along_hw, n, q);
    for (int64_t j = 0; j < n; ++j) {
      q[j] = static_cast<A>(d[j]) * static_cast<A>(x[j]) * q[j] * (A(1) - q[j]);
    }
  }
};

// Where a row starts: batch b, channel c (NCHW) or pixel hw (channels_last).
struct RowStart {
  int64_t b, c, hw;
  bool along_hw;
};

// out = src * (1 + s) + mean_term over a row: src is x (forward) or grad_out (input gradient).
template <typename T, typename A = typename AccT<T>::type>
inline void bam_row(const T* src, T* out, int64_t n, const BamGate<A>& gate, RowStart at,
                    Operand<A> mean_term) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  const V one(1);
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V a, bb;
    IO<T>::load(src + i, a, bb);
    V r[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + h * L;
      const V s = gate.vec(at.b, at.along_hw ? at.c : at.c + j, at.along_hw ? at.hw + j : at.hw, at.along_hw);
      r[h] = (h ? bb : a) * (one + s);
      if (mean_term.vec) {
        r[h] = r[h] + mean_term.load(j);
      } else if (mean_term.scalar != A(0)) {
        r[h] = r[h] + V(mean_term.scalar);
      }
    }
    IO<T>::store(out + i, r[0], r[1]);
  }
  if (i < n) {
    A st[S];
    gate.tail(at.b, at.along_hw ? at.c : at.c + i, at.along_hw ? at.hw + i : at.hw, at.along_hw, n - i, st);
    for (int64_t j = 0; i < n; ++i, ++j) {
      A r = static_cast<A>(src[i]) * (A(1) + st[j]);
      r += mean_term.at(i);
      out[i] = static_cast<T>(r);
    }
  }
}

// The input gradient of a 1x1 projection h = W x (W [R, C]) that a branch of the block starts
// with, added into the block's dx pass: dx[b, c, p] += sum over r < R of W[r, c] * g[b, r, p],
// g = dL/dh [B, R, H, W] dense in x's layout, both in the accumulation dtype.
template <typename A>
struct ProjectionGrad {
  const A* g;
  const A* w;
  int64_t R;
};

// term[j] = base (base_vec[j] when given, else base_scalar) + sum over r < R, in order, of
// scale[r * scale_stride] * rows[r * row_stride + j], for j < n: a row's projection term (NCHW:
// scales are W's column c, rows g's maps; channels_last: scales are g at one pixel, rows W's).
template <typename A>
void projection_term(A* term, int64_t n, const A* base_vec, A base_scalar, const A* scale, int64_t scale_stride,
                     const A* rows, int64_t row_stride, int64_t R) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    V acc = base_vec ? V::loadu(base_vec + j) : V(base_scalar);
    for (int64_t r = 0; r < R; ++r) acc = at::vec::fmadd(V(scale[r * scale_stride]), V::loadu(rows + r * row_stride + j), acc);
    acc.store(term + j);
  }
  for (; j < n; ++j) {
    A acc = base_vec ? base_vec[j] : base_scalar;
    for (int64_t r = 0; r < R; ++r) acc += scale[r * scale_stride] * rows[r * row_stride + j];
    term[j] = acc;
  }
}

// out = src * (1 + s) (+ mean_cmean[b, c] when given) (+ the projection's input gradient when
// proj is not null), both layouts.
template <typename T, typename A>
void bam_rows(const T* src, T* out, const BamGate<A>& gate, const A* mean_term, const Shape& s,
              const ProjectionGrad<A>* proj = nullptr) {
  const int64_t B = s.B, C = s.C, HW = s.HW;
  if (!s.channels_last) {
    at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
      Scratch<A> scratch;
      A* term = proj ? scratch.get(HW) : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / C, c = r % C;
        const A mean = mean_term ? mean_term[r] : A(0);
        if (proj) {
          projection_term<A>(term, HW, nullptr, mean, proj->w + c, C, proj->g + b * proj->R * HW, HW, proj->R);
          bam_row<T, A>(src + r * HW, out + r * HW, HW, gate, RowStart{b, c, 0, true}, along<A>(term));
        } else {
          bam_row<T, A>(src + r * HW, out + r * HW, HW, gate, RowStart{b, c, 0, true}, fixed(mean));
        }
      }
    });
  } else {
    at::parallel_for(0, B * HW, 64, [&](int64_t r0, int64_t r1) {
      Scratch<A> scratch;
      A* term = proj ? scratch.get(C) : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / HW;
        const A* mean = mean_term ? mean_term + b * C : nullptr;
        if (proj) {
          projection_term<A>(term, C, mean, A(0), proj->g + r * proj->R, 1, proj->w, C, proj->R);
          bam_row<T, A>(src + r * C, out + r * C, C, gate, RowStart{b, 0, r % HW, false}, along<A>(term));
        } else {
          bam_row<T, A>(src + r * C, out + r * C, C, gate, RowStart{b, 0, r % HW, false},
                        mean ? along(mean) : fixed(A(0)));
        }
      }
    });
  }
}

// out = mean_cmean[b, c] + the projection's input gradient, both layouts (bam_input_grad without
// grad_out).
template <typename T, typename A>
void projection_rows(T* out, const A* mean_term, const Shape& s, const ProjectionGrad<A>& proj) {
  const int64_t B = s.B, C = s.C, HW = s.HW;
  const bool cl = s.channels_last;
  const int64_t rows = cl ? B * HW : B * C, n = cl ? C : HW;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    Scratch<A> scratch;
    A* term = scratch.get(n);
    for (int64_t r = r0; r < r1; ++r) {
      if (cl) {
        projection_term<A>(term, n, mean_term + (r / HW) * C, A(0), proj.g + r * proj.R, 1, proj.w, C, proj.R);
      } else {
        projection_term<A>(term, n, nullptr, mean_term[r], proj.w + r % C, C, proj.g + (r / C) * proj.R * HW, HW,
                           proj.R);
      }
      for (int64_t j = 0; j < n; ++j) out[r * n + j] = static_cast<T>(term[j]);
    }
  });
}

void check_logits(const Tensor& mc, const Tensor& ms, const Shape& s, const char* fn) {
  check_small(mc, "mc", s.B, s.C, s.acc, fn);
  check_small(ms, "ms", s.B, s.HW, s.acc, fn);
}

}  // namespace

// The checked entries.

Tensor bam_combine(const Tensor& x, const Tensor& mc, const Tensor& ms, bool product) {
  static constexpr const char* fn = "attnkern::bam_combine";
  const Shape s = check_x(x, fn);
  check_logits(mc, ms, s, fn);
  Tensor out = empty_output_like(x);
  ATTNKERN_DISPATCH(x, fn, [&] {
    const BamLogits<A> z{mc.data_ptr<A>(), ms.data_ptr<A>(), s.C, s.HW, product};
    Tensor factors;
    bam_rows<scalar_t, A>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), bam_gate<A>(z, s.B, factors), nullptr, s);
  });
  return out;
}

std::tuple<Tensor, Tensor> bam_combine_backward(const Tensor& grad_out, const Tensor& x,
                                                const Tensor& mc, const Tensor& ms, bool product) {
  static constexpr const char* fn = "attnkern::bam_combine_backward";
  const Shape s = check_x(x, fn);
  check_big(grad_out, "grad_out", x, s, fn);
  check_logits(mc, ms, s, fn);
  auto opts = x.options().dtype(s.acc);
  Tensor grad_mc = at::empty({s.B, s.C}, opts), grad_ms = at::empty({s.B, s.HW}, opts);
  ATTNKERN_DISPATCH(x, fn, [&] {
    const BamLogits<A> z{mc.data_ptr<A>(), ms.data_ptr<A>(), s.C, s.HW, product};
    // grad_mc = sum_hw q (* ms with product), grad_ms = sum_c q (* mc with product)
    Tensor pixel_weight = product ? ms : at::ones({s.B, s.HW}, opts);
    Tensor channel_weight = product ? mc : at::ones({s.B, s.C}, opts);
    Tensor factors;
    const BothAxes<A> r{pixel_weight.data_ptr<A>(), channel_weight.data_ptr<A>(), grad_mc.data_ptr<A>(),
                        grad_ms.data_ptr<A>()};
    reduce_both_axes<scalar_t>(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), s, r,
                               BamLogitGrad<A>{bam_gate<A>(z, s.B, factors)});
  });
  return {grad_mc, grad_ms};
}

Tensor bam_input_grad(const Tensor& x, const OptTensor& grad_out, const Tensor& mc, const Tensor& ms, bool product,
                      const OptTensor& grad_cmean, const OptTensor& grad_proj, const OptTensor& proj_weight) {
  static constexpr const char* fn = "attnkern::bam_input_grad";
  const Shape s = check_x(x, fn);
  check_logits(mc, ms, s, fn);
  if (given(grad_out)) check_big(*grad_out, "grad_out", x, s, fn);
  if (given(grad_cmean)) check_small(*grad_cmean, "grad_cmean", s.B, s.C, s.acc, fn);
  TORCH_CHECK(given(grad_proj) == given(proj_weight), fn, ": grad_proj and proj_weight must be given together");
  const bool has_proj = given(grad_proj);
  int64_t R = 0;
  if (has_proj) {
    R = proj_weight->size(0);
    TORCH_CHECK(proj_weight->dim() == 2 && R > 0 && proj_weight->size(1) == s.C, fn,
                ": proj_weight must be [R, C] with C = ", s.C, ", got shape ", proj_weight->sizes());
    check_small(*proj_weight, "proj_weight", R, s.C, s.acc, fn);
    TORCH_CHECK(grad_proj->sizes() == at::IntArrayRef({s.B, R, x.size(2), x.size(3)}), fn,
                ": grad_proj must be [B, R, H, W] = [", s.B, ", ", R, ", ", x.size(2), ", ", x.size(3), "], got shape ",
                grad_proj->sizes());
    TORCH_CHECK(grad_proj->device().is_cpu() && grad_proj->scalar_type() == s.acc, fn, ": grad_proj must be a CPU ",
                s.acc, " tensor, got ", grad_proj->scalar_type(), " on ", grad_proj->device());
    TORCH_CHECK(grad_proj->is_contiguous(s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
                fn, ": grad_proj must have x's memory format (", s.channels_last ? "channels_last" : "contiguous", ")");
  }
  Tensor dx = empty_output_like(x);
  ATTNKERN_DISPATCH(x, fn, [&] {
    const BamLogits<A> z{mc.data_ptr<A>(), ms.data_ptr<A>(), s.C, s.HW, product};
    Tensor mean_term = given(grad_cmean) ? (*grad_cmean / static_cast<double>(s.HW))
                                         : at::zeros({s.B, s.C}, x.options().dtype(s.acc));
    const ProjectionGrad<A> proj{has_proj ? grad_proj->data_ptr<A>() : nullptr,
                                 has_proj ? proj_weight->data_ptr<A>() : nullptr, R};
    if (!given(grad_out)) {  // no combine term: dx = grad_cmean / HW (+ the projection's term)
      if (has_proj) {
        projection_rows<scalar_t, A>(dx.data_ptr<scalar_t>(), mean_term.data_ptr<A>(), s, proj);
      } else {
        dx.copy_(mean_term.view({s.B, s.C, 1, 1}).expand(x.sizes()).to(x.scalar_type()));
      }
      return;
    }
    Tensor factors;
    bam_rows<scalar_t, A>(grad_out->data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), bam_gate<A>(z, s.B, factors),
                          mean_term.data_ptr<A>(), s, has_proj ? &proj : nullptr);
  });
  return dx;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace attnkern

// The schemas, the tables of the copies and the dispatcher's CPU kernels: once, in the
// baseline build.
#ifdef CPU_CAPABILITY_DEFAULT
ATTNKERN_CPU_KERNEL(bam_combine)
ATTNKERN_CPU_KERNEL(bam_combine_backward)
ATTNKERN_CPU_KERNEL(bam_input_grad)
TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def("bam_combine(Tensor x, Tensor mc, Tensor ms, bool product) -> Tensor");
  m.def("bam_combine_backward(Tensor grad_out, Tensor x, Tensor mc, Tensor ms, bool product) "
      "-> (Tensor, Tensor)");
  m.def("bam_input_grad(Tensor x, Tensor? grad_out, Tensor mc, Tensor ms, bool product, "
      "Tensor? grad_cmean, Tensor? grad_proj=None, Tensor? proj_weight=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("bam_combine", ATTNKERN_ACTIVE_CPU_KERNEL(bam_combine));
  m.impl("bam_combine_backward", ATTNKERN_ACTIVE_CPU_KERNEL(bam_combine_backward));
  m.impl("bam_input_grad", ATTNKERN_ACTIVE_CPU_KERNEL(bam_input_grad));
}
#endif  // CPU_CAPABILITY_DEFAULT
