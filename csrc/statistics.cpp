// Pooled statistics of x: channel_stats (over H*W per (b, c)), spatial_stats (over C of
// x * gc per (b, hw)) and spatial_stats_backward (the channel gate's gradient through them).
#include "common.h"

namespace attnkern {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per vector ISA (cpu_capability.h)
namespace {

// Sum, max and tie count of p[0..n) (times scale[0..n) when given), reduced in a fixed order.
// The max is NaN when an element is (max_count_add_vec leaves that to the caller).
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
    max_count_add_vec(m0, c0, a);
    max_count_add_vec(m1, c1, b);
  }
  sum = sum_lanes(s0 + s1);
  mx = -std::numeric_limits<A>::infinity();
  cnt = 0;
  max_count_merge_vec(m0, c0, m1, c1);
  merge_lanes(m0, c0, mx, cnt);
  for (; i < n; ++i) {
    A y = static_cast<A>(p[i]);
    if (scale) y *= scale[i];
    sum += y;
    max_count_add(mx, cnt, y);
  }
  if (std::isnan(sum)) {
    if (const auto nan = first_nan<T, A>(p, 1, scale, n)) mx = *nan;
  }
}

// Running sum / max / tie count per element: acc[i] (+)= scale[k] * p[k * stride + i] for the
// rows k = 0..K-1 in turn, over a segment of n elements (scale[k] = 1 when scale is null). A NaN
// element leaves its sum NaN but not necessarily its max: the caller fixes the max up once the
// pass is over (first_nan). The accumulators are read and written
// once per K rows rather than once per row: in the NCHW pass across channels (spatial_stats),
// one row at a time, their three loads and three stores, not the row's own bytes, set the
// speed. Rows are added in order, so the result is bitwise that of K single-row passes.
template <typename A>
struct RunningStats {
  A* sum;
  A* max;
  A* count;
};

template <int K, typename T, typename A = typename AccT<T>::type>
inline void accumulate_rows(const T* p, int64_t stride, const A* scale, int64_t n, RunningStats<A> acc) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V s0 = V::loadu(acc.sum + i), s1 = V::loadu(acc.sum + i + L);
    V m0 = V::loadu(acc.max + i), m1 = V::loadu(acc.max + i + L);
    V c0 = V::loadu(acc.count + i), c1 = V::loadu(acc.count + i + L);
    for (int k = 0; k < K; ++k) {
      V a, b;
      IO<T>::load(p + k * stride + i, a, b);
      if (scale) {
        const V sc(scale[k]);
        a = a * sc;
        b = b * sc;
      }
      s0 += a;
      s1 += b;
      max_count_add_vec(m0, c0, a);
      max_count_add_vec(m1, c1, b);
    }
    s0.store(acc.sum + i);
    s1.store(acc.sum + i + L);
    m0.store(acc.max + i);
    m1.store(acc.max + i + L);
    c0.store(acc.count + i);
    c1.store(acc.count + i + L);
  }
  for (; i < n; ++i) {
    for (int k = 0; k < K; ++k) {
      const A y = static_cast<A>(p[k * stride + i]) * (scale ? scale[k] : A(1));
      acc.sum[i] += y;
      max_count_add(acc.max[i], acc.count[i], y);
    }
  }
}

// accumulate_rows over `rows` rows, K at a time; scale[r] is row r's factor (1 when scale is
// null).
template <int K, typename T, typename A = typename AccT<T>::type>
inline void accumulate_row_block(const T* p, int64_t stride, const A* scale, int64_t rows, int64_t n,
                                 RunningStats<A> acc) {
  int64_t r = 0;
  for (; r + K <= rows; r += K) accumulate_rows<K, T, A>(p + r * stride, stride, scale ? scale + r : nullptr, n, acc);
  for (; r < rows; ++r) accumulate_rows<1, T, A>(p + r * stride, stride, scale ? scale + r : nullptr, n, acc);
}

// The outputs of a statistics pass: mean, max and tie count per row.
template <typename A>
struct Stats {
  A* mean;
  A* max;
  int32_t* count;
  inline void set(int64_t r, A sum, A n, A mx, A cnt) const {
    mean[r] = sum / n;
    max[r] = mx;
    count[r] = tie_count(mx, cnt);
  }
};

// ---------------------------------------------------------------------------------------
// channel_stats
// ---------------------------------------------------------------------------------------

// NCHW: one contiguous row of H*W per (b, c).
template <typename T, typename A>
void channel_stats_nchw(const T* x, const Shape& s, Stats<A> out) {
  at::parallel_for(0, s.B * s.C, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      A sum, m, c;
      reduce_row<T, A>(x + r * s.HW, nullptr, s.HW, sum, m, c);
      out.set(r, sum, static_cast<A>(s.HW), m, c);
    }
  });
}

// channels_last: per (b, pixel chunk) partials over the chunk's pixels, merged in order.
template <typename T, typename A>
void channel_stats_channels_last(const T* x, const Shape& s, Stats<A> out) {
  const int64_t B = s.B, C = s.C, HW = s.HW;
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
      const RunningStats<A> acc{ps + t * C, pm + t * C, pc + t * C};
      // float32/float64 one pixel at a time: four at once (as spatial_stats does across
      // channels) measured 5-25% slower. bf16/fp16 four at a time: up to 2x faster, the
      // conversions to float keeping the pass compute-bound.
      constexpr int K = std::is_same_v<T, A> ? 1 : 4;
      accumulate_row_block<K, T, A>(x + (b * HW + h0) * C, C, nullptr, h1 - h0, C, acc);
    }
  });
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        A sum = 0, m = -std::numeric_limits<A>::infinity(), n = 0;
        for (int64_t k = 0; k < nch; ++k) {
          const int64_t i = (b * nch + k) * C + c;
          sum += ps[i];
          max_count_merge(m, n, pm[i], pc[i]);
        }
        if (std::isnan(sum)) {
          if (const auto nan = first_nan<T, A>(x + b * HW * C + c, C, nullptr, HW)) m = *nan;
        }
        out.set(b * C + c, sum, static_cast<A>(HW), m, n);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// spatial_stats
// ---------------------------------------------------------------------------------------

// NCHW: per (b, pixel block), running statistics of the block's pixels over the channels.
template <typename T, typename A>
void spatial_stats_nchw(const T* x, const A* gc, const Shape& s, Stats<A> out) {
  const int64_t B = s.B, C = s.C, HW = s.HW;
  const int64_t blk = pix_block(B, HW), nbl = ceil_div(HW, blk);
  at::parallel_for(0, B * nbl, 1, [&](int64_t t0, int64_t t1) {
    A sum[kPixBlock], m[kPixBlock], n[kPixBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nbl, k = t % nbl;
      const int64_t h0 = k * blk, len = std::min(HW - h0, blk);
      for (int64_t i = 0; i < len; ++i) {
        sum[i] = 0;
        m[i] = -std::numeric_limits<A>::infinity();
        n[i] = 0;
      }
      accumulate_row_block<4, T, A>(x + b * C * HW + h0, HW, gc + b * C, C, len, RunningStats<A>{sum, m, n});
      for (int64_t i = 0; i < len; ++i) {
        if (std::isnan(sum[i])) {
          if (const auto nan = first_nan<T, A>(x + b * C * HW + h0 + i, HW, gc + b * C, C)) m[i] = *nan;
        }
        out.set(b * HW + h0 + i, sum[i], static_cast<A>(C), m[i], n[i]);
      }
    }
  });
}

// channels_last: one contiguous row of C per (b, hw).
template <typename T, typename A>
void spatial_stats_channels_last(const T* x, const A* gc, const Shape& s, Stats<A> out) {
  at::parallel_for(0, s.B * s.HW, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      A sum, m, c;
      reduce_row<T, A>(x + r * s.C, gc + (r / s.HW) * s.C, s.C, sum, m, c);
      out.set(r, sum, static_cast<A>(s.C), m, c);
    }
  });
}

// ---------------------------------------------------------------------------------------
// spatial_stats_backward: grad_gc[b, c] = sum_hw x * (w_mean + w_max * [x * gc == smax])
// with w_mean = grad_smean / C and w_max = grad_smax / scount per (b, hw)
// ---------------------------------------------------------------------------------------

template <typename A>
struct SpatialMaxTerms {
  Operand<A> gc, w_mean, w_max, smax;
};

// sum over the row of x * (w_mean + w_max * [x * gc == smax]), or, with `acc`, the same
// product accumulated per element into acc.
template <typename T, typename A = typename AccT<T>::type>
inline A spatial_max_dot(const T* x, int64_t n, const SpatialMaxTerms<A>& t, A* acc) {
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
      const V y = xv * t.gc.load(j);
      const V weight = t.w_mean.load(j) + ((y == t.smax.load(j)) & t.w_max.load(j));
      const V q = xv * weight;
      if (acc) {
        (V::loadu(acc + j) + q).store(acc + j);
      } else if (h) {
        r1 += q;
      } else {
        r0 += q;
      }
    }
  }
  A r = acc ? A(0) : sum_lanes(r0 + r1);
  for (; i < n; ++i) {
    const A xv = static_cast<A>(x[i]);
    const A y = xv * t.gc.at(i);
    const A weight = t.w_mean.at(i) + (y == t.smax.at(i) ? t.w_max.at(i) : A(0));
    if (acc) {
      acc[i] += xv * weight;
    } else {
      r += xv * weight;
    }
  }
  return r;
}

template <typename T, typename A>
void spatial_stats_backward_nchw(const T* x, const A* gc, const A* smax, const SpatialWeights<A>& w,
                                 const Shape& s, A* grad_gc) {
  const A* wm = w.mean.template data_ptr<A>();
  const A* wx = w.max.template data_ptr<A>();
  at::parallel_for(0, s.B * s.C, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t p = (r / s.C) * s.HW;
      const SpatialMaxTerms<A> t{fixed(gc[r]), along(wm + p), along(wx + p), along(smax + p)};
      grad_gc[r] = spatial_max_dot<T, A>(x + r * s.HW, s.HW, t, nullptr);
    }
  });
}

template <typename T, typename A>
void spatial_stats_backward_channels_last(const T* x, const A* gc, const A* smax,
                                          const SpatialWeights<A>& w, const Shape& s, A* grad_gc) {
  const int64_t B = s.B, C = s.C, HW = s.HW;
  const A* wm = w.mean.template data_ptr<A>();
  const A* wx = w.max.template data_ptr<A>();
  const int64_t nch = ceil_div(HW, kPixChunk);
  Tensor part = at::zeros({B, nch, C}, at::TensorOptions().dtype(s.acc));
  A* pp = part.data_ptr<A>();
  at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nch, k = t % nch;
      const int64_t h0 = k * kPixChunk, h1 = std::min(HW, h0 + kPixChunk);
      for (int64_t hw = h0; hw < h1; ++hw) {
        const int64_t p = b * HW + hw;
        const SpatialMaxTerms<A> terms{along(gc + b * C), fixed(wm[p]), fixed(wx[p]), fixed(smax[p])};
        spatial_max_dot<T, A>(x + p * C, C, terms, pp + t * C);
      }
    }
  });
  sum_partials<A>(pp, B, nch, C, grad_gc);
}

}  // namespace

// The checked entries.

std::tuple<Tensor, Tensor, Tensor> channel_stats(const Tensor& x) {
  static constexpr const char* fn = "attnkern::channel_stats";
  const Shape s = check_x(x, fn);
  auto opts = x.options().dtype(s.acc);
  Tensor mean = at::empty({s.B, s.C}, opts), mx = at::empty({s.B, s.C}, opts);
  Tensor cnt = at::empty({s.B, s.C}, x.options().dtype(at::kInt));
  ATTNKERN_DISPATCH(x, fn, [&] {
    const Stats<A> out{mean.data_ptr<A>(), mx.data_ptr<A>(), cnt.data_ptr<int32_t>()};
    if (s.channels_last) {
      channel_stats_channels_last<scalar_t, A>(x.data_ptr<scalar_t>(), s, out);
    } else {
      channel_stats_nchw<scalar_t, A>(x.data_ptr<scalar_t>(), s, out);
    }
  });
  return {mean, mx, cnt};
}

std::tuple<Tensor, Tensor, Tensor> spatial_stats(const Tensor& x, const Tensor& gc) {
  static constexpr const char* fn = "attnkern::spatial_stats";
  const Shape s = check_x(x, fn);
  check_small(gc, "gc", s.B, s.C, s.acc, fn);
  auto opts = x.options().dtype(s.acc);
  Tensor mean = at::empty({s.B, s.HW}, opts), mx = at::empty({s.B, s.HW}, opts);
  Tensor cnt = at::empty({s.B, s.HW}, x.options().dtype(at::kInt));
  ATTNKERN_DISPATCH(x, fn, [&] {
    const Stats<A> out{mean.data_ptr<A>(), mx.data_ptr<A>(), cnt.data_ptr<int32_t>()};
    if (s.channels_last) {
      spatial_stats_channels_last<scalar_t, A>(x.data_ptr<scalar_t>(), gc.data_ptr<A>(), s, out);
    } else {
      spatial_stats_nchw<scalar_t, A>(x.data_ptr<scalar_t>(), gc.data_ptr<A>(), s, out);
    }
  });
  return {mean, mx, cnt};
}

Tensor spatial_stats_backward(const Tensor& x, const Tensor& gc, const Tensor& smax,
                              const Tensor& scount, const Tensor& grad_smean,
                              const Tensor& grad_smax) {
  static constexpr const char* fn = "attnkern::spatial_stats_backward";
  const Shape s = check_x(x, fn);
  check_small(gc, "gc", s.B, s.C, s.acc, fn);
  check_small(smax, "smax", s.B, s.HW, s.acc, fn);
  check_small(scount, "scount", s.B, s.HW, at::kInt, fn);
  check_small(grad_smean, "grad_smean", s.B, s.HW, s.acc, fn);
  check_small(grad_smax, "grad_smax", s.B, s.HW, s.acc, fn);
  Tensor grad_gc = at::empty({s.B, s.C}, x.options().dtype(s.acc));
  ATTNKERN_DISPATCH(x, fn, [&] {
    const SpatialWeights<A> w = spatial_weights<A>(grad_smean, grad_smax, scount, s.C);
    if (s.channels_last) {
      spatial_stats_backward_channels_last<scalar_t, A>(x.data_ptr<scalar_t>(), gc.data_ptr<A>(),
                                                        smax.data_ptr<A>(), w, s, grad_gc.data_ptr<A>());
    } else {
      spatial_stats_backward_nchw<scalar_t, A>(x.data_ptr<scalar_t>(), gc.data_ptr<A>(),
                                               smax.data_ptr<A>(), w, s, grad_gc.data_ptr<A>());
    }
  });
  return grad_gc;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace attnkern

// The schemas, the tables of the copies and the dispatcher's CPU kernels: once, in the
// baseline build.
#ifdef CPU_CAPABILITY_DEFAULT
ATTNKERN_CPU_KERNEL(channel_stats)
ATTNKERN_CPU_KERNEL(spatial_stats)
ATTNKERN_CPU_KERNEL(spatial_stats_backward)
TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def("channel_stats(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("spatial_stats(Tensor x, Tensor gc) -> (Tensor, Tensor, Tensor)");
  m.def("spatial_stats_backward(Tensor x, Tensor gc, Tensor smax, Tensor scount, Tensor grad_smean, "
      "Tensor grad_smax) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("channel_stats", ATTNKERN_ACTIVE_CPU_KERNEL(channel_stats));
  m.impl("spatial_stats", ATTNKERN_ACTIVE_CPU_KERNEL(spatial_stats));
  m.impl("spatial_stats_backward", ATTNKERN_ACTIVE_CPU_KERNEL(spatial_stats_backward));
}
#endif  // CPU_CAPABILITY_DEFAULT
