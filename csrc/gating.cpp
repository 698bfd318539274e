// attnkern CPU kernels of the pooled-gating primitives shared by CBAM, SE and BAM.
//
// Every kernel streams the big tensor(s) once, contiguously, in either layout the caller
// hands over without a copy: NCHW (each channel's H*W pixels contiguous) or channels_last
// (each pixel's C channels contiguous). Inner loops are at::vec::Vectorized over the
// contiguous dimension (AVX-512 or AVX2, from the build flags); bf16/fp16 are widened to fp32
// in registers; all arithmetic is in the accumulation dtype (fp32, fp64 for fp64 input).
//
// Determinism: work is split into tasks that depend only on the shapes (never on the thread
// count); reductions that cross tasks write per-task partials that are combined in a fixed
// order afterwards. No atomics. Offsets are int64_t throughout.
//
// Max pooling keeps a tie count (the number of elements equal to the max), so gradients can
// be shared between equal maxima the way torch.amax shares them.
#include "gating.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

namespace attnkern {
namespace {

using at::vec::Vectorized;

template <typename T>
struct AccT {
  using type = float;
};
template <>
struct AccT<double> {
  using type = double;
};

// Loads and stores kStep elements of T as two vectors of the accumulation type.
template <typename T>
struct IO {
  using A = typename AccT<T>::type;
  using V = Vectorized<A>;
  static constexpr int64_t kStep = 2 * V::size();
  static inline void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static inline void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
};

template <typename T>
struct IOReduced {
  using A = float;
  using V = Vectorized<float>;
  static constexpr int64_t kStep = Vectorized<T>::size();
  static_assert(Vectorized<T>::size() == 2 * Vectorized<float>::size(), "vector widths");
  static inline void load(const T* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  static inline void store(T* p, const V& a, const V& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
};
template <>
struct IO<at::BFloat16> : IOReduced<at::BFloat16> {};
template <>
struct IO<at::Half> : IOReduced<at::Half> {};

// ---------------------------------------------------------------------------------------
// max with tie count
// ---------------------------------------------------------------------------------------

template <typename A>
inline void maxcnt_add(A& mx, A& cnt, A v) {
  if (v > mx) {
    mx = v;
    cnt = 1;
  } else if (v == mx) {
    cnt += 1;
  } else if (std::isnan(v)) {
    mx = v;  // NaN propagates, as torch.amax
  }
}

template <typename A>
inline void maxcnt_merge(A& mx, A& cnt, A m2, A c2) {
  if (m2 > mx) {
    mx = m2;
    cnt = c2;
  } else if (m2 == mx) {
    cnt += c2;
  } else if (std::isnan(m2)) {
    mx = m2;
  }
}

template <typename V>
inline void vmaxcnt(V& vmx, V& vcnt, const V& v) {
  const V one(1);
  const V gt = v > vmx;
  const V eq = v == vmx;
  vcnt = V::blendv(vcnt + (eq & one), one, gt);
  vmx = at::vec::maximum(vmx, v);
}

template <typename A>
inline void lanes_into(const Vectorized<A>& vmx, const Vectorized<A>& vcnt, A& mx, A& cnt) {
  constexpr int64_t L = Vectorized<A>::size();
  A m[L], c[L];
  vmx.store(m);
  vcnt.store(c);
  for (int64_t l = 0; l < L; ++l) maxcnt_merge(mx, cnt, m[l], c[l]);
}

// The tie count stored with a max: no element equals a NaN max, so its count is 0 (as the
// reference's (x == max).sum() and torch.amax's gradient mask).
template <typename A>
inline int32_t nan_count(A mx, A cnt) {
  return std::isnan(mx) ? 0 : static_cast<int32_t>(cnt);
}

template <typename A>
inline A lanes_sum(const Vectorized<A>& v) {
  constexpr int64_t L = Vectorized<A>::size();
  A s[L];
  v.store(s);
  A r = 0;
  for (int64_t l = 0; l < L; ++l) r += s[l];
  return r;
}

// Sum, max and count of p[0..n) (times scale[0..n) when given), reduced in a fixed order.
template <typename T, typename A = typename AccT<T>::type>
inline void reduce_row(const T* p, const A* scale, int64_t n, A& sum, A& mx, A& cnt) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  const V ninf(-std::numeric_limits<A>::infinity());
  V s0(0), s1(0), m0 = ninf, m1 = ninf, c0(0), c1(0);
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V a, b;
    IO<T>::load(p + i, a, b);
    if (scale) {
      a = a * V::loadu(scale + i);
      b = b * V::loadu(scale + i + L);
    }
    s0 += a;
    s1 += b;
    vmaxcnt(m0, c0, a);
    vmaxcnt(m1, c1, b);
  }
  sum = lanes_sum(s0 + s1);
  mx = -std::numeric_limits<A>::infinity();
  cnt = 0;
  lanes_into(m0, c0, mx, cnt);
  lanes_into(m1, c1, mx, cnt);
  for (; i < n; ++i) {
    A y = static_cast<A>(p[i]);
    if (scale) y *= scale[i];
    sum += y;
    maxcnt_add(mx, cnt, y);
  }
}

// Elementwise accumulation of g * p[0..n) into sum/mx/cnt arrays.
template <typename T, typename A = typename AccT<T>::type>
inline void accum_seg(const T* p, const A* gvec, A g, int64_t n, A* sum, A* mx, A* cnt) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  const V vg(g);
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V a, b;
    IO<T>::load(p + i, a, b);
    if (gvec) {
      a = a * V::loadu(gvec + i);
      b = b * V::loadu(gvec + i + L);
    } else {
      a = a * vg;
      b = b * vg;
    }
    (V::loadu(sum + i) + a).store(sum + i);
    (V::loadu(sum + i + L) + b).store(sum + i + L);
    V m = V::loadu(mx + i), c = V::loadu(cnt + i);
    vmaxcnt(m, c, a);
    m.store(mx + i);
    c.store(cnt + i);
    m = V::loadu(mx + i + L);
    c = V::loadu(cnt + i + L);
    vmaxcnt(m, c, b);
    m.store(mx + i + L);
    c.store(cnt + i + L);
  }
  for (; i < n; ++i) {
    A y = static_cast<A>(p[i]) * (gvec ? gvec[i] : g);
    sum[i] += y;
    maxcnt_add(mx[i], cnt[i], y);
  }
}

// ---------------------------------------------------------------------------------------
// argument checks and shapes
// ---------------------------------------------------------------------------------------

struct Shape {
  int64_t B, C, HW;
  bool cl;  // channels_last: C contiguous per pixel
  at::ScalarType acc;
};

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Shape check_x(const Tensor& x, const char* fn) {
  TORCH_CHECK(x.defined(), fn, ": x is undefined");
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, fn, ": x must be a 4-D tensor [B, C, H, W], got ", x.dim(), "-D");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, fn,
              ": x must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(x.numel() > 0, fn, ": x must not be empty, got shape ", x.sizes());
  Shape s{x.size(0), x.size(1), x.size(2) * x.size(3), false, acc_type(t)};
  if (x.is_contiguous()) {
    s.cl = false;
  } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    s.cl = true;
  } else {
    TORCH_CHECK(false, fn, ": x must be NCHW-contiguous or channels_last-contiguous, got strides ",
                x.strides());
  }
  return s;
}

void check_big(const Tensor& t, const char* name, const Tensor& x, const Shape& s, const char* fn) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == x.sizes(), fn, ": ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(s.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              fn, ": ", name, " must have x's memory format (",
              s.cl ? "channels_last" : "contiguous", ")");
}

void check_small(const Tensor& t, const char* name, int64_t B, int64_t N, at::ScalarType dtype,
                 const char* fn) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == B * N && t.is_contiguous(), fn, ": ", name,
              " must be a contiguous tensor of ", B, " x ", N, " elements, got shape ", t.sizes());
}

// out[b, c] = sum over k of part[b, k, c], in order k = 0, 1, ... (deterministic).
template <typename A>
void sum_partials(const A* part, int64_t B, int64_t K, int64_t C, A* out) {
  at::parallel_for(0, B * C, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / C, c = r % C;
      A sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += part[(b * K + k) * C + c];
      out[r] = sum;
    }
  });
}

// Fixed task sizes: they depend on the shapes only, so results never depend on thread count.
constexpr int64_t kPixBlock = 256;   // pixels per task in NCHW cross-channel passes
constexpr int64_t kPixChunk = 64;    // pixels per task in channels_last cross-pixel passes

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A dense [B, N] accumulation-dtype tensor from an optional one, or `fill` when absent.
Tensor small_or(const OptTensor& t, const char* name, int64_t B, int64_t N, at::ScalarType acc,
                double fill, const char* fn) {
  if (t.has_value() && t->defined()) {
    check_small(*t, name, B, N, acc, fn);
    return *t;
  }
  return at::full({B, N}, fill, at::TensorOptions().dtype(acc));
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// Spatial gradient weights of the max-pooling terms: w1 = dsmean / C, w2 = dsmax / scount.
template <typename A>
void spatial_weights(const Tensor& dsmean, const Tensor& dsmax, const Tensor& scount, int64_t C,
                     Tensor& w1, Tensor& w2) {
  const int64_t n = dsmean.numel();
  w1 = at::empty_like(dsmean);
  w2 = at::empty_like(dsmean);
  const A* dm = dsmean.data_ptr<A>();
  const A* dx = dsmax.data_ptr<A>();
  const int32_t* cn = scount.data_ptr<int32_t>();
  A* a = w1.data_ptr<A>();
  A* b = w2.data_ptr<A>();
  for (int64_t i = 0; i < n; ++i) {
    a[i] = dm[i] / static_cast<A>(C);
    b[i] = cn[i] > 0 ? dx[i] / static_cast<A>(cn[i]) : A(0);
  }
}

// ---------------------------------------------------------------------------------------
// channel_stats: mean, max, count over H*W per (b, c)
// ---------------------------------------------------------------------------------------

template <typename T>
void channel_stats_impl(const T* x, const Shape& s, typename AccT<T>::type* mean,
                        typename AccT<T>::type* mx, int32_t* cnt) {
  using A = typename AccT<T>::type;
  const int64_t B = s.B, C = s.C, HW = s.HW;
  if (!s.cl) {
    at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        A sum, m, c;
        reduce_row<T, A>(x + r * HW, nullptr, HW, sum, m, c);
        mean[r] = sum / static_cast<A>(HW);
        mx[r] = m;
        cnt[r] = nan_count(m, c);
      }
    });
    return;
  }
  const int64_t nch = ceil_div(HW, kPixChunk);
  auto opts = at::TensorOptions().dtype(s.acc);
  Tensor psum = at::zeros({B, nch, C}, opts);
  Tensor pmax = at::full({B, nch, C}, -std::numeric_limits<double>::infinity(), opts);
  Tensor pcnt = at::zeros({B, nch, C}, opts);
  A* ps = psum.data_ptr<A>();
  A* pm = pmax.data_ptr<A>();
  A* pc = pcnt.data_ptr<A>();
  at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nch, k = t % nch;
      const int64_t h0 = k * kPixChunk, h1 = std::min(HW, h0 + kPixChunk);
      for (int64_t hw = h0; hw < h1; ++hw) {
        accum_seg<T, A>(x + (b * HW + hw) * C, nullptr, A(1), C, ps + t * C, pm + t * C, pc + t * C);
      }
    }
  });
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        A sum = 0, m = -std::numeric_limits<A>::infinity(), n = 0;
        for (int64_t k = 0; k < nch; ++k) {
          const int64_t i = (b * nch + k) * C + c;
          sum += ps[i];
          maxcnt_merge(m, n, pm[i], pc[i]);
        }
        mean[b * C + c] = sum / static_cast<A>(HW);
        mx[b * C + c] = m;
        cnt[b * C + c] = nan_count(m, n);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// spatial_stats: mean, max, count over C of x * gc per (b, hw)
// ---------------------------------------------------------------------------------------

template <typename T>
void spatial_stats_impl(const T* x, const typename AccT<T>::type* gc, const Shape& s,
                        typename AccT<T>::type* mean, typename AccT<T>::type* mx, int32_t* cnt) {
  using A = typename AccT<T>::type;
  const int64_t B = s.B, C = s.C, HW = s.HW;
  if (s.cl) {
    at::parallel_for(0, B * HW, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / HW;
        A sum, m, c;
        reduce_row<T, A>(x + r * C, gc + b * C, C, sum, m, c);
        mean[r] = sum / static_cast<A>(C);
        mx[r] = m;
        cnt[r] = nan_count(m, c);
      }
    });
    return;
  }
  const int64_t nbl = ceil_div(HW, kPixBlock);
  at::parallel_for(0, B * nbl, 1, [&](int64_t t0, int64_t t1) {
    A sum[kPixBlock], m[kPixBlock], n[kPixBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nbl, k = t % nbl;
      const int64_t h0 = k * kPixBlock, len = std::min(HW - h0, kPixBlock);
      for (int64_t i = 0; i < len; ++i) {
        sum[i] = 0;
        m[i] = -std::numeric_limits<A>::infinity();
        n[i] = 0;
      }
      for (int64_t c = 0; c < C; ++c) {
        accum_seg<T, A>(x + (b * C + c) * HW + h0, nullptr, gc[b * C + c], len, sum, m, n);
      }
      for (int64_t i = 0; i < len; ++i) {
        mean[b * HW + h0 + i] = sum[i] / static_cast<A>(C);
        mx[b * HW + h0 + i] = m[i];
        cnt[b * HW + h0 + i] = nan_count(m[i], n[i]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// gate_apply: out = (x * gc) * gs
// ---------------------------------------------------------------------------------------

// out[i] = (x[i] * ga[i] or a) * (gb[i] or b) over a contiguous segment.
template <typename T, typename A = typename AccT<T>::type>
inline void scale_seg(const T* x, T* out, int64_t n, const A* ga, A a, const A* gb, A b) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  const V va(a), vb(b);
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V u, w;
    IO<T>::load(x + i, u, w);
    u = u * (ga ? V::loadu(ga + i) : va);
    w = w * (ga ? V::loadu(ga + i + L) : va);
    u = u * (gb ? V::loadu(gb + i) : vb);
    w = w * (gb ? V::loadu(gb + i + L) : vb);
    IO<T>::store(out + i, u, w);
  }
  for (; i < n; ++i) {
    A y = static_cast<A>(x[i]) * (ga ? ga[i] : a);
    y = y * (gb ? gb[i] : b);
    out[i] = static_cast<T>(y);
  }
}

template <typename T>
void gate_apply_impl(const T* x, T* out, const typename AccT<T>::type* gc,
                     const typename AccT<T>::type* gs, const Shape& s) {
  using A = typename AccT<T>::type;
  const int64_t B = s.B, C = s.C, HW = s.HW;
  if (!s.cl) {
    at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / C;
        scale_seg<T, A>(x + r * HW, out + r * HW, HW, nullptr, gc ? gc[r] : A(1), gs ? gs + b * HW : nullptr, A(1));
      }
    });
  } else {
    at::parallel_for(0, B * HW, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / HW;
        scale_seg<T, A>(x + r * C, out + r * C, C, gc ? gc + b * C : nullptr, A(1), nullptr, gs ? gs[r] : A(1));
      }
    });
  }
}

// ---------------------------------------------------------------------------------------
// Two-axis reductions in one pass: for each element a value q(b, c, hw) is computed from
// dout and x; R_c[b, c] = sum_hw q * wc[b, hw] and R_hw[b, hw] = sum_c q * whw[b, c].
// Used by gate_bwd_a (q = dout * x) and bam_combine_bwd (q = dout * x * s * (1 - s)).
// The functor gives q for a vector of elements along the contiguous axis.
// ---------------------------------------------------------------------------------------

template <typename T, typename QFn>
void two_axis_reduce(const T* dout, const T* x, const Shape& s, const typename AccT<T>::type* wc,
                     const typename AccT<T>::type* whw, typename AccT<T>::type* Rc,
                     typename AccT<T>::type* Rhw, QFn qfn) {
  using A = typename AccT<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  const int64_t B = s.B, C = s.C, HW = s.HW;
  auto opts = at::TensorOptions().dtype(s.acc);
  if (!s.cl) {
    // task (b, pixel block): loop over channels; R_hw accumulates per pixel across channels,
    // R_c gets one partial per (block, c).
    const int64_t nbl = ceil_div(HW, kPixBlock);
    Tensor part = at::empty({B, nbl, C}, opts);
    A* pp = part.data_ptr<A>();
    at::parallel_for(0, B * nbl, 1, [&](int64_t t0, int64_t t1) {
      A acc[kPixBlock];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / nbl, k = t % nbl;
        const int64_t h0 = k * kPixBlock, len = std::min(HW - h0, kPixBlock);
        for (int64_t i = 0; i < len; ++i) acc[i] = 0;
        const A* wrow = wc + b * HW + h0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = (b * C + c) * HW + h0;
          const A wh = whw[b * C + c];
          const V vwh(wh);
          V r0(0), r1(0);
          int64_t i = 0;
          for (; i + S <= len; i += S) {
            V d0, d1, x0, x1;
            IO<T>::load(dout + off + i, d0, d1);
            IO<T>::load(x + off + i, x0, x1);
            const V q0 = qfn.vec(d0, x0, b, c, h0 + i, /*along_hw=*/true);
            const V q1 = qfn.vec(d1, x1, b, c, h0 + i + L, true);
            r0 += q0 * V::loadu(wrow + i);
            r1 += q1 * V::loadu(wrow + i + L);
            (V::loadu(acc + i) + q0 * vwh).store(acc + i);
            (V::loadu(acc + i + L) + q1 * vwh).store(acc + i + L);
          }
          A rc = lanes_sum(r0 + r1);
          for (; i < len; ++i) {
            const A q = qfn.scalar(static_cast<A>(dout[off + i]), static_cast<A>(x[off + i]), b, c, h0 + i);
            rc += q * wrow[i];
            acc[i] += q * wh;
          }
          pp[t * C + c] = rc;
        }
        for (int64_t i = 0; i < len; ++i) Rhw[b * HW + h0 + i] = acc[i];
      }
    });
    sum_partials<A>(pp, B, nbl, C, Rc);
    return;
  }
  // channels_last: task (b, pixel chunk): per pixel, R_hw is a reduction along the contiguous
  // channels; R_c accumulates per channel across the chunk's pixels into a partial.
  const int64_t nch = ceil_div(HW, kPixChunk);
  Tensor part = at::zeros({B, nch, C}, opts);
  A* pp = part.data_ptr<A>();
  at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nch, k = t % nch;
      const int64_t h0 = k * kPixChunk, h1 = std::min(HW, h0 + kPixChunk);
      A* acc = pp + t * C;
      const A* wrow = whw + b * C;
      for (int64_t hw = h0; hw < h1; ++hw) {
        const int64_t off = (b * HW + hw) * C;
        const A w = wc[b * HW + hw];
        const V vw(w);
        V r0(0), r1(0);
        int64_t i = 0;
        for (; i + S <= C; i += S) {
          V d0, d1, x0, x1;
          IO<T>::load(dout + off + i, d0, d1);
          IO<T>::load(x + off + i, x0, x1);
          const V q0 = qfn.vec(d0, x0, b, i, hw, /*along_hw=*/false);
          const V q1 = qfn.vec(d1, x1, b, i + L, hw, false);
          r0 += q0 * V::loadu(wrow + i);
          r1 += q1 * V::loadu(wrow + i + L);
          (V::loadu(acc + i) + q0 * vw).store(acc + i);
          (V::loadu(acc + i + L) + q1 * vw).store(acc + i + L);
        }
        A rh = lanes_sum(r0 + r1);
        for (; i < C; ++i) {
          const A q = qfn.scalar(static_cast<A>(dout[off + i]), static_cast<A>(x[off + i]), b, i, hw);
          rh += q * wrow[i];
          acc[i] += q * w;
        }
        Rhw[b * HW + hw] = rh;
      }
    }
  });
  sum_partials<A>(pp, B, nch, C, Rc);
}

// q = dout * x
template <typename A>
struct ProductQ {
  using V = Vectorized<A>;
  inline V vec(const V& d, const V& x, int64_t, int64_t, int64_t, bool) const { return d * x; }
  inline A scalar(A d, A x, int64_t, int64_t, int64_t) const { return d * x; }
};

template <typename A>
inline A sigmoid_s(A z) {
  return A(1) / (A(1) + std::exp(-z));
}

template <typename A>
inline Vectorized<A> sigmoid_v(const Vectorized<A>& z) {
  const Vectorized<A> one(1);
  return one / (one + z.neg().exp());
}

// BAM logits z = mc[b, c] (+ or *) ms[b, hw], for a vector along the contiguous axis.
template <typename A>
struct BamZ {
  using V = Vectorized<A>;
  const A* mc;
  const A* ms;
  int64_t C, HW;
  bool product;
  // along_hw: the vector runs over 8/16 pixels of one channel c (NCHW); else over channels
  // of one pixel hw (channels_last). `c` / `hw` is the vector's first index.
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
};

// q = dout * x * s * (1 - s), s = sigmoid(z)
template <typename A>
struct BamQ {
  using V = Vectorized<A>;
  BamZ<A> z;
  inline V vec(const V& d, const V& x, int64_t b, int64_t c, int64_t hw, bool along_hw) const {
    const V s = sigmoid_v(z.vec(b, c, hw, along_hw));
    return d * x * s * (V(1) - s);
  }
  inline A scalar(A d, A x, int64_t b, int64_t c, int64_t hw) const {
    const A s = sigmoid_s(z.scalar(b, c, hw));
    return d * x * s * (A(1) - s);
  }
};

// ---------------------------------------------------------------------------------------
// cbam_bwd_b: dgc[b, c] = sum_hw x * (w1 + w2 * [x * gc == smax])
// ---------------------------------------------------------------------------------------

template <typename T, typename A = typename AccT<T>::type>
inline A dot_masked(const T* x, int64_t n, const A* gvec, A g, const A* w1v, A w1, const A* w2v,
                    A w2, const A* smv, A sm, A* acc_out /* per-element accumulate, or null */) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  V r0(0), r1(0);
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V a, b;
    IO<T>::load(x + i, a, b);
    for (int h = 0; h < 2; ++h) {
      const V xv = h ? b : a;
      const int64_t j = i + h * L;
      const V gg = gvec ? V::loadu(gvec + j) : V(g);
      const V y = xv * gg;
      const V mask = y == (smv ? V::loadu(smv + j) : V(sm));
      const V t = (w1v ? V::loadu(w1v + j) : V(w1)) + (mask & (w2v ? V::loadu(w2v + j) : V(w2)));
      const V q = xv * t;
      if (acc_out) {
        (V::loadu(acc_out + j) + q).store(acc_out + j);
      } else if (h) {
        r1 += q;
      } else {
        r0 += q;
      }
    }
  }
  A r = acc_out ? A(0) : lanes_sum(r0 + r1);
  for (; i < n; ++i) {
    const A xv = static_cast<A>(x[i]);
    const A y = xv * (gvec ? gvec[i] : g);
    const A t = (w1v ? w1v[i] : w1) + (y == (smv ? smv[i] : sm) ? (w2v ? w2v[i] : w2) : A(0));
    if (acc_out) {
      acc_out[i] += xv * t;
    } else {
      r += xv * t;
    }
  }
  return r;
}

// ---------------------------------------------------------------------------------------
// gate_bwd_c: dx = (dout * gc) * gs + gc * (w1 + w2 * [x * gc == smax]) + u1 + u2 * [x == cmax]
// (absent terms come as neutral arrays: gates 1, weights 0)
// ---------------------------------------------------------------------------------------

// The terms present are compile-time flags, so SE's dx (dout * gc + dcmean / HW) does none
// of CBAM's max-mask work.
template <typename T, typename A, bool DOUT, bool SP, bool CMX>
inline void dx_seg(const T* x, const T* dout, T* dx, int64_t n,
                   // per element (vector) or scalar for the segment, for each operand:
                   const A* gcv, A gc, const A* gsv, A gs, const A* w1v, A w1, const A* w2v, A w2,
                   const A* smv, A sm, const A* u1v, A u1, const A* u2v, A u2, const A* cmv, A cm) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  auto ld = [](const A* p, A s, int64_t j) { return p ? V::loadu(p + j) : V(s); };
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V xa, xb, da, db;
    if constexpr (SP || CMX) IO<T>::load(x + i, xa, xb);
    if constexpr (DOUT) IO<T>::load(dout + i, da, db);
    V out[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + h * L;
      const V g = ld(gcv, gc, j);
      V r = ld(u1v, u1, j);
      if constexpr (DOUT) r = r + ((h ? db : da) * g) * ld(gsv, gs, j);
      if constexpr (SP) {
        const V y = (h ? xb : xa) * g;
        r = r + g * (ld(w1v, w1, j) + ((y == ld(smv, sm, j)) & ld(w2v, w2, j)));
      }
      if constexpr (CMX) r = r + (((h ? xb : xa) == ld(cmv, cm, j)) & ld(u2v, u2, j));
      out[h] = r;
    }
    IO<T>::store(dx + i, out[0], out[1]);
  }
  for (; i < n; ++i) {
    const A xv = static_cast<A>(x[i]);
    const A g = gcv ? gcv[i] : gc;
    A r = u1v ? u1v[i] : u1;
    if constexpr (DOUT) r = r + (static_cast<A>(dout[i]) * g) * (gsv ? gsv[i] : gs);
    if constexpr (SP) {
      const A y = xv * g;
      r = r + g * ((w1v ? w1v[i] : w1) + (y == (smv ? smv[i] : sm) ? (w2v ? w2v[i] : w2) : A(0)));
    }
    if constexpr (CMX) r = r + (xv == (cmv ? cmv[i] : cm) ? (u2v ? u2v[i] : u2) : A(0));
    dx[i] = static_cast<T>(r);
  }
}

// BAM: out = x * (1 + s) [+ u1] with s = sigmoid(z); dout scales (1 + s) in the backward.
template <typename T, typename A = typename AccT<T>::type>
inline void bam_seg(const T* x, const T* dout, T* out, int64_t n, const BamZ<A>& z, int64_t b,
                    int64_t c, int64_t hw, bool along_hw, const A* u1v, A u1) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  const V one(1);
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V a, bb;
    IO<T>::load(dout ? dout + i : x + i, a, bb);
    V r[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + h * L;
      const V s = sigmoid_v(z.vec(b, along_hw ? c : c + j, along_hw ? hw + j : hw, along_hw));
      r[h] = (h ? bb : a) * (one + s);
      if (u1v) r[h] = r[h] + V::loadu(u1v + j);
      else if (u1 != A(0)) r[h] = r[h] + V(u1);
    }
    IO<T>::store(out + i, r[0], r[1]);
  }
  for (; i < n; ++i) {
    const A s = sigmoid_s(z.scalar(b, along_hw ? c : c + i, along_hw ? hw + i : hw));
    A r = static_cast<A>(dout ? dout[i] : x[i]) * (A(1) + s);
    r += u1v ? u1v[i] : u1;
    out[i] = static_cast<T>(r);
  }
}

template <typename A>
const A* opt_ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

}  // namespace

// =========================================================================================
// entry points
// =========================================================================================

std::tuple<Tensor, Tensor, Tensor> channel_stats(const Tensor& x) {
  static constexpr const char* fn = "attnkern._C.channel_stats";
  const Shape s = check_x(x, fn);
  auto opts = x.options().dtype(s.acc);
  Tensor mean = at::empty({s.B, s.C}, opts), mx = at::empty({s.B, s.C}, opts);
  Tensor cnt = at::empty({s.B, s.C}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), fn, [&] {
    using A = typename AccT<scalar_t>::type;
    channel_stats_impl<scalar_t>(x.data_ptr<scalar_t>(), s, mean.data_ptr<A>(), mx.data_ptr<A>(),
                                 cnt.data_ptr<int32_t>());
  });
  return {mean, mx, cnt};
}

std::tuple<Tensor, Tensor, Tensor> spatial_stats(const Tensor& x, const Tensor& gc) {
  static constexpr const char* fn = "attnkern._C.spatial_stats";
  const Shape s = check_x(x, fn);
  check_small(gc, "gc", s.B, s.C, s.acc, fn);
  auto opts = x.options().dtype(s.acc);
  Tensor mean = at::empty({s.B, s.HW}, opts), mx = at::empty({s.B, s.HW}, opts);
  Tensor cnt = at::empty({s.B, s.HW}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), fn, [&] {
    using A = typename AccT<scalar_t>::type;
    spatial_stats_impl<scalar_t>(x.data_ptr<scalar_t>(), gc.data_ptr<A>(), s, mean.data_ptr<A>(),
                                 mx.data_ptr<A>(), cnt.data_ptr<int32_t>());
  });
  return {mean, mx, cnt};
}

Tensor gate_apply(const Tensor& x, const OptTensor& gc, const OptTensor& gs) {
  static constexpr const char* fn = "attnkern._C.gate_apply";
  const Shape s = check_x(x, fn);
  if (given(gc)) check_small(*gc, "gc", s.B, s.C, s.acc, fn);
  if (given(gs)) check_small(*gs, "gs", s.B, s.HW, s.acc, fn);
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), fn, [&] {
    using A = typename AccT<scalar_t>::type;
    gate_apply_impl<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              given(gc) ? gc->data_ptr<A>() : nullptr,
                              given(gs) ? gs->data_ptr<A>() : nullptr, s);
  });
  return out;
}

std::tuple<OptTensor, OptTensor> gate_bwd_a(const Tensor& dout, const Tensor& x,
                                            const OptTensor& gc, const OptTensor& gs,
                                            bool need_dgc, bool need_dgs) {
  static constexpr const char* fn = "attnkern._C.gate_bwd_a";
  const Shape s = check_x(x, fn);
  check_big(dout, "dout", x, s, fn);
  Tensor gc1 = small_or(gc, "gc", s.B, s.C, s.acc, 1.0, fn);
  Tensor gs1 = small_or(gs, "gs", s.B, s.HW, s.acc, 1.0, fn);
  auto opts = x.options().dtype(s.acc);
  Tensor dgc = at::empty({s.B, s.C}, opts), dgs = at::empty({s.B, s.HW}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), fn, [&] {
    using A = typename AccT<scalar_t>::type;
    two_axis_reduce<scalar_t>(dout.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), s,
                              gs1.data_ptr<A>(), gc1.data_ptr<A>(), dgc.data_ptr<A>(),
                              dgs.data_ptr<A>(), ProductQ<A>{});
  });
  return {need_dgc ? OptTensor(dgc) : OptTensor(), need_dgs ? OptTensor(dgs) : OptTensor()};
}

Tensor cbam_bwd_b(const Tensor& x, const Tensor& gc, const Tensor& smax, const Tensor& scount,
                  const Tensor& dsmean, const Tensor& dsmax) {
  static constexpr const char* fn = "attnkern._C.cbam_bwd_b";
  const Shape s = check_x(x, fn);
  check_small(gc, "gc", s.B, s.C, s.acc, fn);
  check_small(smax, "smax", s.B, s.HW, s.acc, fn);
  check_small(scount, "scount", s.B, s.HW, at::kInt, fn);
  check_small(dsmean, "dsmean", s.B, s.HW, s.acc, fn);
  check_small(dsmax, "dsmax", s.B, s.HW, s.acc, fn);
  Tensor dgc = at::empty({s.B, s.C}, x.options().dtype(s.acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), fn, [&] {
    using A = typename AccT<scalar_t>::type;
    Tensor w1, w2;
    spatial_weights<A>(dsmean, dsmax, scount, s.C, w1, w2);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const A* g = gc.data_ptr<A>();
    const A* sm = smax.data_ptr<A>();
    const A* a1 = w1.data_ptr<A>();
    const A* a2 = w2.data_ptr<A>();
    A* out = dgc.data_ptr<A>();
    const int64_t B = s.B, C = s.C, HW = s.HW;
    if (!s.cl) {
      at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / C;
          out[r] = dot_masked<scalar_t, A>(xp + r * HW, HW, nullptr, g[r], a1 + b * HW, A(0),
                                        a2 + b * HW, A(0), sm + b * HW, A(0), nullptr);
        }
      });
    } else {
      const int64_t nch = ceil_div(HW, kPixChunk);
      Tensor part = at::zeros({B, nch, C}, x.options().dtype(s.acc));
      A* pp = part.data_ptr<A>();
      at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / nch, k = t % nch;
          const int64_t h0 = k * kPixChunk, h1 = std::min(HW, h0 + kPixChunk);
          for (int64_t hw = h0; hw < h1; ++hw) {
            const int64_t p = b * HW + hw;
            dot_masked<scalar_t, A>(xp + p * C, C, g + b * C, A(0), nullptr, a1[p], nullptr, a2[p],
                                 nullptr, sm[p], pp + t * C);
          }
        }
      });
      sum_partials<A>(pp, B, nch, C, out);
    }
  });
  return dgc;
}

Tensor gate_bwd_c(const Tensor& x, const OptTensor& dout, const OptTensor& gc,
                  const OptTensor& gs, const OptTensor& smax, const OptTensor& scount,
                  const OptTensor& dsmean, const OptTensor& dsmax, const OptTensor& cmax,
                  const OptTensor& ccount, const OptTensor& dcmean, const OptTensor& dcmax) {
  static constexpr const char* fn = "attnkern._C.gate_bwd_c";
  const Shape s = check_x(x, fn);
  if (given(dout)) check_big(*dout, "dout", x, s, fn);
  const bool spatial = given(dsmean) || given(dsmax);
  TORCH_CHECK(!given(dsmax) || (given(smax) && given(scount)), fn,
              ": dsmax needs smax and scount");
  TORCH_CHECK(!given(dcmax) || (given(cmax) && given(ccount)), fn,
              ": dcmax needs cmax and ccount");
  Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), fn, [&] {
    using A = typename AccT<scalar_t>::type;
    const int64_t B = s.B, C = s.C, HW = s.HW;
    Tensor gc1 = small_or(gc, "gc", B, C, s.acc, 1.0, fn);
    Tensor gs1 = small_or(gs, "gs", B, HW, s.acc, 1.0, fn);
    // spatial-stats terms: w1 = dsmean / C, w2 = dsmax / scount
    Tensor w1, w2, sm;
    if (spatial) {
      Tensor dm = small_or(dsmean, "dsmean", B, HW, s.acc, 0.0, fn);
      Tensor dmx = small_or(dsmax, "dsmax", B, HW, s.acc, 0.0, fn);
      Tensor cn = given(scount) ? *scount : at::ones({B, HW}, x.options().dtype(at::kInt));
      check_small(cn, "scount", B, HW, at::kInt, fn);
      sm = small_or(smax, "smax", B, HW, s.acc, 0.0, fn);
      spatial_weights<A>(dm, dmx, cn, C, w1, w2);
    }
    // channel-stats terms: u1 = dcmean / HW, u2 = dcmax / ccount
    Tensor u1 = at::zeros({B, C}, x.options().dtype(s.acc));
    Tensor u2 = at::zeros({B, C}, x.options().dtype(s.acc));
    Tensor cm;
    {
      A* p1 = u1.data_ptr<A>();
      A* p2 = u2.data_ptr<A>();
      if (given(dcmean)) {
        check_small(*dcmean, "dcmean", B, C, s.acc, fn);
        const A* d = dcmean->data_ptr<A>();
        for (int64_t i = 0; i < B * C; ++i) p1[i] = d[i] / static_cast<A>(HW);
      }
      if (given(dcmax)) {
        check_small(*dcmax, "dcmax", B, C, s.acc, fn);
        check_small(*ccount, "ccount", B, C, at::kInt, fn);
        check_small(*cmax, "cmax", B, C, s.acc, fn);
        const A* d = dcmax->data_ptr<A>();
        const int32_t* n = ccount->data_ptr<int32_t>();
        for (int64_t i = 0; i < B * C; ++i) p2[i] = n[i] > 0 ? d[i] / static_cast<A>(n[i]) : A(0);
        cm = *cmax;
      }
    }
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = given(dout) ? dout->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = dx.data_ptr<scalar_t>();
    const A* g = gc1.data_ptr<A>();
    const A* gsp = gs1.data_ptr<A>();
    const A* a1 = opt_ptr<A>(w1);
    const A* a2 = opt_ptr<A>(w2);
    const A* smp = opt_ptr<A>(sm);
    const A* v1 = u1.data_ptr<A>();
    const A* v2 = u2.data_ptr<A>();
    const A* cmp = opt_ptr<A>(cm);
    auto run = [&](auto dout_t, auto sp_t, auto cmx_t) {
      constexpr bool DOUT = decltype(dout_t)::value, SP = decltype(sp_t)::value, CMX = decltype(cmx_t)::value;
      if (!s.cl) {
        at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / C, o = r * HW, pb = b * HW;
            dx_seg<scalar_t, A, DOUT, SP, CMX>(
                xp + o, dp ? dp + o : nullptr, op + o, HW, nullptr, g[r], gsp + pb, A(0),
                a1 ? a1 + pb : nullptr, A(0), a2 ? a2 + pb : nullptr, A(0), smp ? smp + pb : nullptr,
                A(0), nullptr, v1[r], nullptr, v2[r], nullptr, cmp ? cmp[r] : A(0));
          }
        });
      } else {
        at::parallel_for(0, B * HW, 64, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / HW, o = r * C, cb = b * C;
            dx_seg<scalar_t, A, DOUT, SP, CMX>(
                xp + o, dp ? dp + o : nullptr, op + o, C, g + cb, A(0), nullptr, gsp[r], nullptr,
                a1 ? a1[r] : A(0), nullptr, a2 ? a2[r] : A(0), nullptr, smp ? smp[r] : A(0), v1 + cb,
                A(0), v2 + cb, A(0), cmp ? cmp + cb : nullptr, A(0));
          }
        });
      }
    };
    using T_ = std::true_type;
    using F_ = std::false_type;
    const bool has_dout = dp != nullptr, has_cmx = cmp != nullptr;
    if (has_dout && spatial && has_cmx) run(T_{}, T_{}, T_{});
    else if (has_dout && spatial) run(T_{}, T_{}, F_{});
    else if (has_dout && has_cmx) run(T_{}, F_{}, T_{});
    else if (has_dout) run(T_{}, F_{}, F_{});
    else if (spatial && has_cmx) run(F_{}, T_{}, T_{});
    else if (spatial) run(F_{}, T_{}, F_{});
    else if (has_cmx) run(F_{}, F_{}, T_{});
    else run(F_{}, F_{}, F_{});
  });
  return dx;
}

namespace {
void check_bam(const Tensor& mc, const Tensor& ms, const Shape& s, const char* fn) {
  check_small(mc, "mc", s.B, s.C, s.acc, fn);
  check_small(ms, "ms", s.B, s.HW, s.acc, fn);
}
}  // namespace

Tensor bam_combine(const Tensor& x, const Tensor& mc, const Tensor& ms, bool product) {
  static constexpr const char* fn = "attnkern._C.bam_combine";
  const Shape s = check_x(x, fn);
  check_bam(mc, ms, s, fn);
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), fn, [&] {
    using A = typename AccT<scalar_t>::type;
    const BamZ<A> z{mc.data_ptr<A>(), ms.data_ptr<A>(), s.C, s.HW, product};
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t B = s.B, C = s.C, HW = s.HW;
    if (!s.cl) {
      at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          bam_seg<scalar_t, A>(xp + r * HW, nullptr, op + r * HW, HW, z, r / C, r % C, 0, true, nullptr, A(0));
      });
    } else {
      at::parallel_for(0, B * HW, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          bam_seg<scalar_t, A>(xp + r * C, nullptr, op + r * C, C, z, r / HW, 0, r % HW, false, nullptr, A(0));
      });
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> bam_combine_bwd(const Tensor& dout, const Tensor& x, const Tensor& mc,
                                           const Tensor& ms, bool product) {
  static constexpr const char* fn = "attnkern._C.bam_combine_bwd";
  const Shape s = check_x(x, fn);
  check_big(dout, "dout", x, s, fn);
  check_bam(mc, ms, s, fn);
  auto opts = x.options().dtype(s.acc);
  Tensor dmc = at::empty({s.B, s.C}, opts), dms = at::empty({s.B, s.HW}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), fn, [&] {
    using A = typename AccT<scalar_t>::type;
    const BamZ<A> z{mc.data_ptr<A>(), ms.data_ptr<A>(), s.C, s.HW, product};
    // dmc = sum_hw q (* ms), dms = sum_c q (* mc)
    Tensor wc = product ? ms : at::ones({s.B, s.HW}, opts);
    Tensor whw = product ? mc : at::ones({s.B, s.C}, opts);
    two_axis_reduce<scalar_t>(dout.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), s, wc.data_ptr<A>(),
                              whw.data_ptr<A>(), dmc.data_ptr<A>(), dms.data_ptr<A>(), BamQ<A>{z});
  });
  return {dmc, dms};
}

Tensor bam_dx(const Tensor& x, const OptTensor& dout, const Tensor& mc, const Tensor& ms,
              bool product, const OptTensor& dcmean) {
  static constexpr const char* fn = "attnkern._C.bam_dx";
  const Shape s = check_x(x, fn);
  check_bam(mc, ms, s, fn);
  if (given(dout)) check_big(*dout, "dout", x, s, fn);
  if (given(dcmean)) check_small(*dcmean, "dcmean", s.B, s.C, s.acc, fn);
  Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), fn, [&] {
    using A = typename AccT<scalar_t>::type;
    const int64_t B = s.B, C = s.C, HW = s.HW;
    const BamZ<A> z{mc.data_ptr<A>(), ms.data_ptr<A>(), C, HW, product};
    Tensor u1 = given(dcmean) ? (*dcmean / static_cast<double>(HW)) : at::zeros({B, C}, x.options().dtype(s.acc));
    const A* up = u1.data_ptr<A>();
    scalar_t* op = dx.data_ptr<scalar_t>();
    if (!given(dout)) {  // only the mean-pool term: dx[b, c, :] = dcmean / HW
      Tensor full = u1.view({B, C, 1, 1}).expand(x.sizes()).to(x.scalar_type());
      dx.copy_(full);
      return;
    }
    const scalar_t* dp = dout->data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (!s.cl) {
      at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          bam_seg<scalar_t, A>(xp + r * HW, dp + r * HW, op + r * HW, HW, z, r / C, r % C, 0, true, nullptr, up[r]);
      });
    } else {
      at::parallel_for(0, B * HW, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / HW;
          bam_seg<scalar_t, A>(xp + r * C, dp + r * C, op + r * C, C, z, b, 0, r % HW, false, up + b * C, A(0));
        }
      });
    }
  });
  return dx;
}

}  // namespace attnkern
