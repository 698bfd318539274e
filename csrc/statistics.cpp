// Pooled statistics of x: channel_stats (over H*W per (b, c)), spatial_stats (over C of
// x * gc per (b, hw)) and spatial_stats_backward (the channel gate's gradient through them).
#include <vector>

#include "common.h"

namespace attnkern {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per vector ISA (cpu_capability.h)
namespace {

// The lane vectors of p[0..n) (times scale[0..n) when given, in pair order: in_pair_order):
// per lane, the sum (s), and the max (m) and tie count (c) of the elements it holds. bfloat16
// rows load in element pairs (load_step). A last partial step loads the rest zero-padded and
// updates only their lanes' max and count (sixteen scalar steps with a branch each made a 28x28
// row's tail cost as much as its vector body). With `prefetch`, the same step of the row that
// starts there is asked into L2 as this one is read.
template <typename T, typename A = typename AccT<T>::type>
inline void row_lanes(const T* p, const A* scale, int64_t n, Vectorized<A>& s, Vectorized<A>& m,
                      Vectorized<A>& c, const T* prefetch = nullptr) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  const V ninf(-std::numeric_limits<A>::infinity());
  V s0(0), s1(0), m0 = ninf, m1 = ninf, c0(0), c1(0);
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    if (prefetch) prefetch_step_l2(prefetch + i);
    V a, b;
    load_step(p + i, a, b);
    if (scale) {
      a = a * V::loadu(scale + i);
      b = b * V::loadu(scale + i + L);
    }
    s0 += a;
    s1 += b;
    max_count_add_vec(m0, c0, a);
    max_count_add_vec(m1, c1, b);
  }
  if (const int64_t rest = n - i; rest > 0) {
    const RestSplit<T> split(rest);
    V a, b;
    load_step_partial(p + i, rest, a, b);
    if (scale) {
      V sa, sb;
      split.load(scale + i, sa, sb);
      a = a * sa;
      b = b * sb;
    }
    s0 += a;
    s1 += b;
    V m0n = m0, c0n = c0, m1n = m1, c1n = c1;
    max_count_add_vec(m0n, c0n, a);
    max_count_add_vec(m1n, c1n, b);
    m0 = V::set(m0, m0n, split.rest0);
    c0 = V::set(c0, c0n, split.rest0);
    m1 = V::set(m1, m1n, split.rest1);
    c1 = V::set(c1, c1n, split.rest1);
  }
  s = s0 + s1;
  max_count_merge_vec(m0, c0, m1, c1);
  m = m0;
  c = c0;
}

// The max of a row whose lanes are merged: NaN when an element was (max_count_add_vec leaves
// that to the caller; a NaN sum tells), the merged max otherwise.
template <typename T, typename A = typename AccT<T>::type>
inline void fix_nan_max(const T* p, const A* scale, int64_t n, A sum, A& mx) {
  if (std::isnan(sum)) {
    if (const auto nan = first_nan<T, A>(p, 1, scale, n)) mx = *nan;
  }
}

// Sum, max and tie count of p[0..n) (times scale[0..n) when given; scale_lanes: the same in
// pair order), reduced in a fixed order. The max is NaN when an element is.
template <typename T, typename A = typename AccT<T>::type>
inline void reduce_row(const T* p, const A* scale, const A* scale_lanes, int64_t n, A& sum, A& mx, A& cnt,
                       const T* prefetch = nullptr) {
  Vectorized<A> s, m, c;
  row_lanes<T, A>(p, scale_lanes, n, s, m, c, prefetch);
  sum = sum_lanes(s);
  mx = -std::numeric_limits<A>::infinity();
  cnt = 0;
  merge_lanes(m, c, mx, cnt);
  fix_nan_max<T, A>(p, scale, n, sum, mx);
}

// Running sum / max / tie count per element: acc[i] (+)= scale[k] * p[k * stride + i] for the
// rows k = 0..K-1 in turn, over a segment of n elements (scale[k] = 1 when scale is null); for
// bfloat16 the accumulators are in pair order (load_pairs: element i at pair_slot<T>(i, n)),
// which halves the instructions of each vector's widening. The accumulators are read and
// written once per K rows rather than once per row: in the NCHW pass across channels
// (spatial_stats), one row at a time, their three loads and three stores, not the row's own
// bytes, set the speed. Rows are added in order, as K single-row passes add them.
// A NaN element leaves its sum NaN but not necessarily its max: the caller fixes the max up
// once the pass is over (first_nan). With `prefetch`, the same segment of the K rows that
// start there is asked into L2 as this one is read (prefetch_l2; those rows must exist).
template <typename A>
struct RunningStats {
  A* sum;
  A* max;
  A* count;
  RunningStats at(int64_t i) const { return {sum + i, max + i, count + i}; }
};

// One row's step (a, b) times *scale (when given) into the running sums (s0, s1), maxima (m0,
// m1) and tie counts (c0, c1) of accumulate_rows.
template <typename V>
inline void add_row_step(V a, V b, const typename V::value_type* scale, V& s0, V& s1, V& m0, V& m1, V& c0, V& c1) {
  if (scale) {
    const V sc(*scale);
    a = a * sc;
    b = b * sc;
  }
  s0 += a;
  s1 += b;
  max_count_add_vec(m0, c0, a);
  max_count_add_vec(m1, c1, b);
}

// The last partial step of accumulate_rows (rest < kStep elements of each row from p on, into
// acc from its start), not a scalar loop: the rows loaded zero-padded, the accumulators loaded
// and stored as rest0 then rest1 elements (as pair_slot places them). Out of line, so that
// accumulate_rows stays small enough to inline: inlined with it, the channels_last float32
// channel_stats (one call per pixel row) ran 1.2-1.6x slower under AVX-512.
template <int K, typename T, typename A>
C10_NOINLINE void accumulate_rows_rest(const T* p, int64_t stride, const A* scale, int64_t rest, RunningStats<A> acc) {
  using V = Vectorized<A>;
  const RestSplit<T> split(rest);
  V s0, s1, m0, m1, c0, c1;
  split.load(acc.sum, s0, s1);
  split.load(acc.max, m0, m1);
  split.load(acc.count, c0, c1);
  for (int k = 0; k < K; ++k) {
    V a, b;
    load_step_partial(p + k * stride, rest, a, b);
    // lanes past the rest see zeros and are not stored
    add_row_step(a, b, scale ? scale + k : nullptr, s0, s1, m0, m1, c0, c1);
  }
  split.store(acc.sum, s0, s1);
  split.store(acc.max, m0, m1);
  split.store(acc.count, c0, c1);
}

template <int K, bool kPrefetch, typename T, typename A = typename AccT<T>::type>
inline void accumulate_rows(const T* p, int64_t stride, const A* scale, int64_t n, RunningStats<A> acc,
                            const T* prefetch) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V s0 = V::loadu(acc.sum + i), s1 = V::loadu(acc.sum + i + L);
    V m0 = V::loadu(acc.max + i), m1 = V::loadu(acc.max + i + L);
    V c0 = V::loadu(acc.count + i), c1 = V::loadu(acc.count + i + L);
    for (int k = 0; k < K; ++k) {
      if constexpr (kPrefetch) prefetch_step_l2(prefetch + k * stride + i);
      V a, b;
      load_step(p + k * stride + i, a, b);
      add_row_step(a, b, scale ? scale + k : nullptr, s0, s1, m0, m1, c0, c1);
    }
    s0.store(acc.sum + i);
    s1.store(acc.sum + i + L);
    m0.store(acc.max + i);
    m1.store(acc.max + i + L);
    c0.store(acc.count + i);
    c1.store(acc.count + i + L);
  }
  if (i < n) accumulate_rows_rest<K, T, A>(p + i, stride, scale, n - i, acc.at(i));
}

// accumulate_rows over `rows` rows, K at a time; scale[r] is row r's factor (1 when scale is
// null). With prefetch_rows > 0, each group of rows asks for the rows prefetch_rows further on
// as long as those exist: rows_readable rows (at least `rows`) may be read from p on.
template <int K, typename T, typename A = typename AccT<T>::type>
inline void accumulate_row_block(const T* p, int64_t stride, const A* scale, int64_t rows, int64_t n,
                                 RunningStats<A> acc, int64_t prefetch_rows = 0, int64_t rows_readable = 0) {
  const auto rows_at = [&](int64_t r) { return p + r * stride; };
  const auto scale_at = [&](int64_t r) { return scale ? scale + r : nullptr; };
  // K rows at a time, asking for the K rows prefetch_rows further on while those exist; the
  // rest without asking
  int64_t r = 0;
  const int64_t last_ahead = prefetch_rows > 0 ? std::min(rows, rows_readable - prefetch_rows) : 0;
  for (; r + K <= last_ahead; r += K)
    accumulate_rows<K, true, T, A>(rows_at(r), stride, scale_at(r), n, acc, rows_at(r + prefetch_rows));
  for (; r + K <= rows; r += K) accumulate_rows<K, false, T, A>(rows_at(r), stride, scale_at(r), n, acc, nullptr);
  for (; r < rows; ++r) accumulate_rows<1, false, T, A>(rows_at(r), stride, scale_at(r), n, acc, nullptr);
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

// The statistics of rows r0..r1, each n contiguous elements from row(r) (times scale(r)[0..n)
// when that is not null; scale_lanes(r): the same in pair order), into out. kLaneGroup rows at
// a time share their lane merges (merge_lanes_of_rows), bitwise the results of one row at a
// time; the rest go one at a time. Each row asks for the row prefetch_rows further on as it is
// read, while that is one of the `rows` rows there are.
template <typename T, typename A, typename RowAt, typename ScaleAt, typename ScaleLanesAt>
inline void reduce_rows(int64_t r0, int64_t r1, int64_t n, const RowAt& row, const ScaleAt& scale,
                        const ScaleLanesAt& scale_lanes, Stats<A> out, int64_t prefetch_rows, int64_t rows) {
  const auto ahead = [&](int64_t r) -> const T* {
    return prefetch_rows > 0 && r + prefetch_rows < rows ? row(r + prefetch_rows) : nullptr;
  };
  int64_t r = r0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (kLaneGroup<A> > 1) {
    constexpr int G = kLaneGroup<A>;
    for (; r + G <= r1; r += G) {
      Vectorized<A> vs[G], vm[G], vc[G];
      for (int k = 0; k < G; ++k) row_lanes<T, A>(row(r + k), scale_lanes(r + k), n, vs[k], vm[k], vc[k], ahead(r + k));
      A sum[G], mx[G], cnt[G];
      sum_lanes_of_rows(vs, sum);
      merge_lanes_of_rows(vm, vc, mx, cnt);
      for (int k = 0; k < G; ++k) {
        fix_nan_max<T, A>(row(r + k), scale(r + k), n, sum[k], mx[k]);
        out.set(r + k, sum[k], static_cast<A>(n), mx[k], cnt[k]);
      }
    }
  }
#endif
  for (; r < r1; ++r) {
    A sum, m, c;
    reduce_row<T, A>(row(r), scale(r), scale_lanes(r), n, sum, m, c, ahead(r));
    out.set(r, sum, static_cast<A>(n), m, c);
  }
}

// ---------------------------------------------------------------------------------------
// channel_stats
// ---------------------------------------------------------------------------------------

// NCHW: one contiguous row of H*W per (b, c), kLaneGroup rows at a time (reduce_rows): at 14x14
// and 28x28 (196 and 784 pixels) a row's own lane merges cost about as much as its vector loop.
// The rows ~32 KB further on are prefetched: 1.2-2x from DRAM on an Intel Xeon.
template <typename T, typename A>
void channel_stats_nchw(const T* x, const Shape& s, Stats<A> out) {
  const int64_t HW = s.HW;
  const auto row = [&](int64_t r) { return x + r * HW; };
  const auto unscaled = [](int64_t) -> const A* { return nullptr; };
  at::parallel_for(0, s.B * s.C, 1, [&](int64_t r0, int64_t r1) {
    reduce_rows<T, A>(r0, r1, HW, row, unscaled, unscaled, out, rows_ahead(HW * int64_t(sizeof(T))), s.B * s.C);
  });
}

// channels_last: per (b, pixel chunk) partials over the chunk's pixels, merged in order.
template <typename T, typename A>
void channel_stats_channels_last(const T* x, const Shape& s, Stats<A> out) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t B = s.B, C = s.C, HW = s.HW;
  const int64_t nch = ceil_div(HW, kPixChunk), parts = B * nch * C;
  // sums, maxima and tie counts per (b, chunk, c); each task sets its own before adding
  Tensor part = at::empty({3 * parts}, at::TensorOptions().dtype(s.acc));
  A* ps = part.data_ptr<A>();
  A* pm = ps + parts;
  A* pc = pm + parts;
  // float32/float64 one pixel at a time: several at once measured 5-25% slower. bf16/fp16 four
  // at a time: up to 2x faster, the conversions to float keeping the pass compute-bound.
  constexpr int K = std::is_same_v<T, A> ? 1 : 4;
  // The pixels of a chunk are short rows of C read K at a time: prefetched ~32 KB ahead, this
  // pass ran 1.1-2.9x faster from DRAM (AMD EPYC, AVX-512 and AVX2 copies).
  const int64_t ahead = std::max<int64_t>(K, rows_ahead(C * int64_t(sizeof(T))));
  at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nch, k = t % nch;
      const int64_t h0 = k * kPixChunk, h1 = std::min(HW, h0 + kPixChunk);
      std::fill_n(ps + t * C, C, A(0));
      std::fill_n(pm + t * C, C, -std::numeric_limits<A>::infinity());
      std::fill_n(pc + t * C, C, A(0));
      const RunningStats<A> acc{ps + t * C, pm + t * C, pc + t * C};
      const int64_t p0 = b * HW + h0;
      accumulate_row_block<K, T, A>(x + p0 * C, C, nullptr, h1 - h0, C, acc, ahead, B * HW - p0);
    }
  });
  // Merge the chunks in order, a vector of channels at a time (the same order per channel).
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> sum(C), mx(C), cnt(C);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t first = b * nch * C;
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        V vs = V::loadu(ps + first + c), vm = V::loadu(pm + first + c), vc = V::loadu(pc + first + c);
        for (int64_t k = 1; k < nch; ++k) {
          const int64_t i = first + k * C + c;
          vs += V::loadu(ps + i);
          max_count_merge_vec(vm, vc, V::loadu(pm + i), V::loadu(pc + i));
        }
        vs.store(sum.data() + c);
        vm.store(mx.data() + c);
        vc.store(cnt.data() + c);
      }
      for (; c < C; ++c) {
        sum[c] = 0;
        mx[c] = -std::numeric_limits<A>::infinity();
        cnt[c] = 0;
        for (int64_t k = 0; k < nch; ++k) {
          const int64_t i = first + k * C + c;
          sum[c] += ps[i];
          max_count_merge(mx[c], cnt[c], pm[i], pc[i]);
        }
      }
      // the accumulators are in pair order (accumulate_rows); the merge above is slot by slot
      for (c = 0; c < C; ++c) {
        const int64_t j = pair_slot<T>(c, C);
        if (std::isnan(sum[j])) {
          if (const auto nan = first_nan<T, A>(x + b * HW * C + c, C, nullptr, HW)) mx[j] = *nan;
        }
        out.set(b * C + c, sum[j], static_cast<A>(HW), mx[j], cnt[j]);
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
      // the next group's rows are asked into L2 as this one is read: 1.0-1.7x from DRAM
      constexpr int K = 8;
      accumulate_row_block<K, T, A>(x + b * C * HW + h0, HW, gc + b * C, C, len, RunningStats<A>{sum, m, n}, K, C);
      for (int64_t i = 0; i < len; ++i) {
        const int64_t j = pair_slot<T>(i, len);
        if (std::isnan(sum[j])) {
          if (const auto nan = first_nan<T, A>(x + b * C * HW + h0 + i, HW, gc + b * C, C)) m[j] = *nan;
        }
        out.set(b * HW + h0 + i, sum[j], static_cast<A>(C), m[j], n[j]);
      }
    }
  });
}

// channels_last: one contiguous row of C per (b, hw), kLaneGroup rows at a time (reduce_rows);
// bfloat16 rows in pairs, with gc in pair order. The rows ~32 KB further on are prefetched:
// 1.1-2x from DRAM on an Intel Xeon.
template <typename T, typename A>
void spatial_stats_channels_last(const T* x, const A* gc, const Shape& s, Stats<A> out) {
  const int64_t C = s.C, HW = s.HW;
  Tensor storage;
  const A* gc_lanes = in_pair_order<T>(gc, s.B, C, storage);
  const auto row = [&](int64_t r) { return x + r * C; };
  const auto scale = [&](int64_t r) { return gc + (r / HW) * C; };
  const auto scale_lanes = [&](int64_t r) { return gc_lanes + (r / HW) * C; };
  at::parallel_for(0, s.B * HW, 64, [&](int64_t r0, int64_t r1) {
    reduce_rows<T, A>(r0, r1, C, row, scale, scale_lanes, out, rows_ahead(C * int64_t(sizeof(T))), s.B * HW);
  });
}

// ---------------------------------------------------------------------------------------
// spatial_stats_backward: grad_gc[b, c] = sum_hw x * (w_mean + w_max * [x * gc == smax])
// with w_mean = grad_smean / C and w_max = grad_smax / scount per (b, hw)
// ---------------------------------------------------------------------------------------

// channels_last: acc[i] += x_i * (w_mean + w_max * [x_i * gc[i] == smax]) along one pixel's
// n channels (w_mean, w_max and smax are the pixel's; gc and acc in pair order, as the row's
// steps load it: load_step). The last partial step is one zero-padded vector step. With
// `prefetch`, the row that far on is asked into L2 as this one is read.
template <typename T, typename A = typename AccT<T>::type>
inline void spatial_max_accumulate(const T* x, int64_t n, const A* gc, A wm, A wx, A smax, A* acc,
                                   const T* prefetch) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  const V vwm(wm), vwx(wx), vsm(smax);
  const auto term = [&](const V& v, const V& g) { return v * (vwm + ((v * g == vsm) & vwx)); };
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    if (prefetch) prefetch_step_l2(prefetch + i);
    V a, b;
    load_step(x + i, a, b);
    (V::loadu(acc + i) + term(a, V::loadu(gc + i))).store(acc + i);
    (V::loadu(acc + i + L) + term(b, V::loadu(gc + i + L))).store(acc + i + L);
  }
  if (const int64_t rest = n - i; rest > 0) {
    const RestSplit<T> split(rest);
    V a, b, g0, g1, acc0, acc1;
    load_step_partial(x + i, rest, a, b);
    split.load(gc + i, g0, g1);
    split.load(acc + i, acc0, acc1);
    split.store(acc + i, acc0 + term(a, g0), acc1 + term(b, g1));
  }
}

// NCHW: K channel rows of one image at a time, sharing the loads of the per-pixel terms:
// out[k] = sum over the row of x_k * (w_mean + w_max * [x_k * gc[k] == smax]). Each row keeps its
// own accumulators, in the order of one row at a time; the last partial step is one
// zero-padded vector step. bfloat16 rows load in element order: in pairs, with the three terms
// put in pair order, this pass measured 0.96-1.01x in cache (28x28, 14x14, 56x56). With
// `prefetch`, the same step of the K rows that start there (n apart) is asked into L2.
template <int K, typename T, typename A = typename AccT<T>::type>
inline void spatial_max_dot_rows(const T* x, int64_t n, const A* gc, const A* wm, const A* wx,
                                 const A* smax, A* out, const T* prefetch) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  V r0[K], r1[K];
  for (int k = 0; k < K; ++k) r0[k] = r1[k] = V(0);
  // the K rows' steps at i (whole, or the first `count` elements), against the terms' two
  // vectors there
  const auto add_rows = [&](auto whole, int64_t i, int64_t count, const V& wm0, const V& wm1,
                            const V& wx0, const V& wx1, const V& sm0, const V& sm1) {
#pragma GCC unroll 8  // the K rows' accumulators stay in registers
    for (int k = 0; k < K; ++k) {
      V a, b;
      if constexpr (decltype(whole)::value) {
        IO<T>::load(x + k * n + i, a, b);
      } else {
        IO<T>::load_partial(x + k * n + i, count, a, b);
      }
      const V g(gc[k]);
      r0[k] += a * (wm0 + ((a * g == sm0) & wx0));
      r1[k] += b * (wm1 + ((b * g == sm1) & wx1));
    }
  };
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    if (prefetch) {
      for (int k = 0; k < K; ++k) prefetch_step_l2(prefetch + k * n + i);
    }
    add_rows(std::true_type{}, i, S, V::loadu(wm + i), V::loadu(wm + i + L), V::loadu(wx + i), V::loadu(wx + i + L),
             V::loadu(smax + i), V::loadu(smax + i + L));
  }
  if (const int64_t rest = n - i; rest > 0) {
    // lanes past the rest: x, the terms and so the products are zero
    const RestSplit<T, false> split(rest);
    V wm0, wm1, wx0, wx1, sm0, sm1;
    split.load(wm + i, wm0, wm1);
    split.load(wx + i, wx0, wx1);
    split.load(smax + i, sm0, sm1);
    add_rows(std::false_type{}, i, rest, wm0, wm1, wx0, wx1, sm0, sm1);
  }
  for (int k = 0; k < K; ++k) out[k] = sum_lanes(r0[k] + r1[k]);
}

// Rows of kSharedTermsMinPixels or more go four channels at a time: sharing the loads of the
// three per-pixel terms (w_mean, w_max, smax) between four rows measured 1.5-2x faster at 56x56.
// Each group asks for the next group's rows, each single row for the row ~32 KB further on:
// 1.0-1.6x from DRAM on an Intel Xeon (0.98x in float32 at 112x112).
template <typename T, typename A>
void spatial_stats_backward_nchw(const T* x, const A* gc, const A* smax, const SpatialWeights<A>& w,
                                 const Shape& s, A* grad_gc) {
  constexpr int K = 4;
  const A* wm = w.mean.template data_ptr<A>();
  const A* wx = w.max.template data_ptr<A>();
  const int64_t C = s.C, HW = s.HW;
  const int64_t k = HW >= kSharedTermsMinPixels ? K : 1, groups = ceil_div(C, k);
  const int64_t rows = s.B * C, ahead = rows_ahead(HW * int64_t(sizeof(T)));
  // the rows `ahead` further on (the next group's where rows go K at a time), while they exist
  const auto later = [&](int64_t r, int64_t n) -> const T* {
    const int64_t step = n == K ? K : ahead;
    return r + step + n <= rows ? x + (r + step) * HW : nullptr;
  };
  at::parallel_for(0, s.B * groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / groups, c0 = (t % groups) * k, p = b * HW;
      if (k == K && c0 + K <= C) {
        const int64_t r = b * C + c0;
        spatial_max_dot_rows<K, T, A>(x + r * HW, HW, gc + r, wm + p, wx + p, smax + p, grad_gc + r, later(r, K));
      } else {
        for (int64_t r = b * C + c0; r < b * C + std::min(C, c0 + k); ++r)
          spatial_max_dot_rows<1, T, A>(x + r * HW, HW, gc + r, wm + p, wx + p, smax + p, grad_gc + r,
                                        later(r, 1));
      }
    }
  });
}

// channels_last: task (b, pixel chunk) adds its pixels' terms into a partial per channel, one
// pixel at a time, the row ~32 KB further on prefetched (pixels two or four at a time, sharing
// the partials' loads and stores, measured no faster); the partials are summed in chunk order.
template <typename T, typename A>
void spatial_stats_backward_channels_last(const T* x, const A* gc, const A* smax,
                                          const SpatialWeights<A>& w, const Shape& s, A* grad_gc) {
  const int64_t B = s.B, C = s.C, HW = s.HW;
  const A* wm = w.mean.template data_ptr<A>();
  const A* wx = w.max.template data_ptr<A>();
  Tensor gc_pairs;  // gc and the partials in pair order where the rows load in pairs
  gc = in_pair_order<T>(gc, B, C, gc_pairs);
  const int64_t nch = ceil_div(HW, kPixChunk);
  const int64_t ahead = rows_ahead(C * int64_t(sizeof(T)));
  Tensor part = at::empty({B, nch, C}, at::TensorOptions().dtype(s.acc));  // each task zeroes its own
  A* pp = part.data_ptr<A>();
  at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nch, k = t % nch;
      const int64_t h0 = k * kPixChunk, h1 = std::min(HW, h0 + kPixChunk);
      A* acc = pp + t * C;
      std::fill_n(acc, C, A(0));
      for (int64_t p = b * HW + h0; p < b * HW + h1; ++p) {
        const T* next = p + ahead < B * HW ? x + (p + ahead) * C : nullptr;
        spatial_max_accumulate<T, A>(x + p * C, C, gc + b * C, wm[p], wx[p], smax[p], acc, next);
      }
    }
  });
  sum_partials<A>(pp, B, nch, C, grad_gc);
  from_pair_order<T>(grad_gc, B, C);
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
