// One pass that reduces a per-element value q(b, c, hw) over both axes at once:
//   per_channel[b, c] = sum_hw q * pixel_weight[b, hw]
//   per_pixel[b, hw]  = sum_c  q * channel_weight[b, c]
// gate_apply_backward (q = grad_out * x) and bam_combine_backward (q = grad_out * x * s(1 - s))
// use it. `Q` gives q for a vector of elements along the contiguous axis (`vec`). Where q
// depends on the two elements alone (Q::kElementsOnly: zeros give zero, wherever they sit), a
// row's rest is one zero-padded vector step, and bfloat16 rows in channels_last load in
// element pairs (load_pairs), the channel weights and the per-channel accumulators in pair
// order. Otherwise Q also gives q for a row's tail of n < IO<T>::kStep elements starting at
// (b, c, hw) (`tail`, into q[0..n)), and rows load in element order.
#pragma once

#include "common.h"

namespace attnkern {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per vector ISA (cpu_capability.h)

template <typename A>
struct BothAxes {
  const A* pixel_weight;    // [B, HW]
  const A* channel_weight;  // [B, C]
  A* per_channel;           // [B, C]
  A* per_pixel;             // [B, HW]
};

// NCHW, K channel rows of the task's pixel block at a time: per_pixel's accumulators and the
// pixel weights are loaded once per K rows (their loads and stores, not the rows' own bytes, set
// the speed one row at a time). Each channel keeps its own reduction, and each pixel receives
// its channels' terms in channel order: the order of additions is that of one row at a time.
// bfloat16 rows load in element order: in pairs, with the pixel weights and accumulators in
// pair order, gate_apply_backward measured 0.94-1.10x in cache (14x14 to 56x56). With a
// prefetch_offset (elements), the same step of both inputs' rows that far on is asked into L2.
template <int K, typename T, typename Q, typename A>
inline void reduce_rows_both_axes(const T* grad_out, const T* x, int64_t HW, int64_t len, int64_t b,
                                  int64_t c0, int64_t h0, const A* pw, const A* cw, A* acc, A* rc,
                                  const Q& q, int64_t prefetch_offset) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  V r0[K], r1[K];
  for (int k = 0; k < K; ++k) r0[k] = r1[k] = V(0);
  // the K rows' step at i (whole, or its first `count` elements) into their reductions and into
  // the per-pixel accumulators (a0, a1), with the pixel weights (w0, w1)
  const auto add_rows = [&](auto whole, int64_t i, int64_t count, const V& w0, const V& w1, V& a0, V& a1) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      const int64_t off = k * HW + i;
      V d0, d1, x0, x1;
      if constexpr (decltype(whole)::value) {
        IO<T>::load(grad_out + off, d0, d1);
        IO<T>::load(x + off, x0, x1);
      } else {
        IO<T>::load_partial(grad_out + off, count, d0, d1);
        IO<T>::load_partial(x + off, count, x0, x1);
      }
      const V q0 = q.vec(d0, x0, b, c0 + k, h0 + i, /*along_hw=*/true);
      const V q1 = q.vec(d1, x1, b, c0 + k, h0 + i + L, true);
      r0[k] += q0 * w0;
      r1[k] += q1 * w1;
      const V vcw(cw[k]);
      a0 += q0 * vcw;
      a1 += q1 * vcw;
    }
  };
  int64_t i = 0;
  for (; i + S <= len; i += S) {
    if (prefetch_offset) {
      for (int k = 0; k < K; ++k) {
        prefetch_step_l2(grad_out + prefetch_offset + k * HW + i);
        prefetch_step_l2(x + prefetch_offset + k * HW + i);
      }
    }
    V a0 = V::loadu(acc + i), a1 = V::loadu(acc + i + L);
    add_rows(std::true_type{}, i, S, V::loadu(pw + i), V::loadu(pw + i + L), a0, a1);
    a0.store(acc + i);
    a1.store(acc + i + L);
  }
  if constexpr (Q::kElementsOnly) {
    if (i < len) {  // lanes past the rest: q is zero, and they are not stored
      const RestSplit<T, false> split(len - i);
      V w0, w1, a0, a1;
      split.load(pw + i, w0, w1);
      split.load(acc + i, a0, a1);
      add_rows(std::false_type{}, i, len - i, w0, w1, a0, a1);
      split.store(acc + i, a0, a1);
    }
  }
  for (int k = 0; k < K; ++k) {
    A r = sum_lanes(r0[k] + r1[k]);
    if constexpr (!Q::kElementsOnly) {
      if (i < len) {
        A qt[S];
        const int64_t off = k * HW + i;
        q.tail(grad_out + off, x + off, len - i, b, c0 + k, h0 + i, /*along_hw=*/true, qt);
        for (int64_t j = 0; i + j < len; ++j) {
          r += qt[j] * pw[i + j];
          acc[i + j] += qt[j] * cw[k];
        }
      }
    }
    rc[k] = r;
  }
}

// NCHW: task (b, pixel block) loops over channels (four at a time where the block is part of
// a row); per_pixel accumulates per pixel across channels, per_channel gets one partial per
// (block, c), summed in block order. Whole rows ask for the row ~32 KB further on, a block's
// single rows for the next channel's; from DRAM on an Intel Xeon, 1.05-1.5x. Four rows at a time
// ask for the next four in bfloat16/half only: 1.1-1.3x there, but 0.83-0.94x in float32
// (56x56, 112x112).
template <typename T, typename Q, typename A = typename AccT<T>::type>
void reduce_both_axes_nchw(const T* grad_out, const T* x, const Shape& s, const BothAxes<A>& r,
                           const Q& q) {
  constexpr int K = 4;
  const int64_t B = s.B, C = s.C, HW = s.HW;
  const int64_t blk = pix_block(B, HW), nbl = ceil_div(HW, blk);
  Tensor part = at::empty({B, nbl, C}, at::TensorOptions().dtype(s.acc));
  A* pp = part.data_ptr<A>();
  const int64_t rows = B * C, ahead = rows_ahead(2 * HW * int64_t(sizeof(T)));
  // the offset of the rows `step` further on, 0 where they do not all exist
  const auto later = [&](int64_t r, int64_t step, int64_t n) -> int64_t {
    return r + step + n <= rows ? step * HW : 0;
  };
  at::parallel_for(0, B * nbl, 1, [&](int64_t t0, int64_t t1) {
    A acc[kPixBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nbl, k = t % nbl;
      const int64_t h0 = k * blk, len = std::min(HW - h0, blk);
      for (int64_t i = 0; i < len; ++i) acc[i] = 0;
      const A* pw = r.pixel_weight + b * HW + h0;
      int64_t c = 0;
      // Where the block is the whole row, consecutive channel rows are one contiguous stream:
      // one row at a time keeps it so (grouping measured 0.45-0.7x at 28x28); where it is not,
      // every row is its own stream anyway and grouping measured 1.15-2x (56x56, 112x112).
      for (; len < HW && c + K <= C; c += K) {
        const int64_t off = (b * C + c) * HW + h0;
        reduce_rows_both_axes<K, T, Q, A>(grad_out + off, x + off, HW, len, b, c, h0, pw,
                                          r.channel_weight + b * C + c, acc, pp + t * C + c, q,
                                          sizeof(T) < 4 ? later(b * C + c, K, K) : 0);
      }
      for (; c < C; ++c) {
        const int64_t off = (b * C + c) * HW + h0;
        reduce_rows_both_axes<1, T, Q, A>(grad_out + off, x + off, HW, len, b, c, h0, pw,
                                          r.channel_weight + b * C + c, acc, pp + t * C + c, q,
                                          later(b * C + c, len < HW ? 1 : ahead, 1));
      }
      for (int64_t i = 0; i < len; ++i) r.per_pixel[b * HW + h0 + i] = acc[i];
    }
  });
  sum_partials<A>(pp, B, nbl, C, r.per_channel);
}

// channels_last: task (b, pixel chunk), one pixel at a time, the rows of both inputs ~32 KB
// further on prefetched (pixels two or four at a time, sharing the partials' loads and stores,
// measured no faster); per pixel, per_pixel is a reduction along the contiguous channels, its
// lanes merged kLaneGroup pixels at a time (sum_lanes_of_rows: the same sums as one
// pixel at a time); per_channel accumulates across the chunk's pixels into a partial, summed in
// chunk order. channel_weight and the partials in pair order where the rows load in pairs.
template <typename T, typename Q, typename A = typename AccT<T>::type>
void reduce_both_axes_channels_last(const T* grad_out, const T* x, const Shape& s,
                                    const BothAxes<A>& r, const Q& q) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  constexpr bool kPairs = Q::kElementsOnly && kPairLoads<T>;
  const int64_t B = s.B, C = s.C, HW = s.HW;
  const int64_t nch = ceil_div(HW, kPixChunk);
  const int64_t ahead = rows_ahead(2 * C * int64_t(sizeof(T)));
  Tensor part = at::empty({B, nch, C}, at::TensorOptions().dtype(s.acc));  // each task zeroes its own
  A* pp = part.data_ptr<A>();
  Tensor weight_pairs;
  const A* channel_weight = r.channel_weight;
  if constexpr (kPairs) channel_weight = in_pair_order<T>(r.channel_weight, B, C, weight_pairs);
  at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nch, k = t % nch;
      const int64_t h0 = k * kPixChunk, h1 = std::min(HW, h0 + kPixChunk);
      A* acc = pp + t * C;
      std::fill_n(acc, C, A(0));
      const A* cw = channel_weight + b * C;
      // pixel hw's vector part: acc[0..i) += q * w, and the lanes of its per-pixel sum (with
      // the rest of the channels where that is a vector step)
      const auto pixel_lanes = [&](int64_t hw) {
        const int64_t off = (b * HW + hw) * C;
        const int64_t pf = b * HW + hw + ahead < B * HW ? ahead * C : 0;  // 0: nothing to ask for
        const V vw(r.pixel_weight[b * HW + hw]);
        V r0(0), r1(0);
        int64_t i = 0;
        for (; i + S <= C; i += S) {
          if (pf) {
            prefetch_step_l2(grad_out + off + pf + i);
            prefetch_step_l2(x + off + pf + i);
          }
          V d0, d1, x0, x1;
          load_step<T, kPairs>(grad_out + off + i, d0, d1);
          load_step<T, kPairs>(x + off + i, x0, x1);
          const V q0 = q.vec(d0, x0, b, i, hw, /*along_hw=*/false);
          const V q1 = q.vec(d1, x1, b, i + L, hw, false);
          r0 += q0 * V::loadu(cw + i);
          r1 += q1 * V::loadu(cw + i + L);
          (V::loadu(acc + i) + q0 * vw).store(acc + i);
          (V::loadu(acc + i + L) + q1 * vw).store(acc + i + L);
        }
        if constexpr (Q::kElementsOnly) {
          if (i < C) {  // lanes past the rest: q is zero, and they are not stored
            const RestSplit<T, kPairs> split(C - i);
            V d0, d1, x0, x1, w0, w1, a0, a1;
            load_step_partial<T, kPairs>(grad_out + off + i, C - i, d0, d1);
            load_step_partial<T, kPairs>(x + off + i, C - i, x0, x1);
            const V q0 = q.vec(d0, x0, b, i, hw, false), q1 = q.vec(d1, x1, b, i + L, hw, false);
            split.load(cw + i, w0, w1);
            split.load(acc + i, a0, a1);
            r0 += q0 * w0;
            r1 += q1 * w1;
            split.store(acc + i, a0 + q0 * vw, a1 + q1 * vw);
          }
        }
        return r0 + r1;
      };
      // the channels past the last full vector step where they are not (`tail`), added to the
      // merged lanes rh
      const int64_t i_tail = C / S * S;
      const auto pixel_tail = [&](int64_t hw, A rh) {
        if constexpr (!Q::kElementsOnly) {
          if (i_tail < C) {
            const int64_t off = (b * HW + hw) * C;
            const A w = r.pixel_weight[b * HW + hw];
            A qt[S];
            q.tail(grad_out + off + i_tail, x + off + i_tail, C - i_tail, b, i_tail, hw, /*along_hw=*/false, qt);
            for (int64_t i = i_tail, j = 0; i < C; ++i, ++j) {
              rh += qt[j] * cw[i];
              acc[i] += qt[j] * w;
            }
          }
        }
        r.per_pixel[b * HW + hw] = rh;
      };
      int64_t hw = h0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      // kLaneGroup pixels at a time share the merges of their lanes (bitwise those of sum_lanes)
      if constexpr (kLaneGroup<A> > 1) {
        constexpr int G = kLaneGroup<A>;
        for (; hw + G <= h1; hw += G) {
          V lanes[G];
          for (int g = 0; g < G; ++g) lanes[g] = pixel_lanes(hw + g);
          A rh[G];
          sum_lanes_of_rows(lanes, rh);
          for (int g = 0; g < G; ++g) pixel_tail(hw + g, rh[g]);
        }
      }
#endif
      for (; hw < h1; ++hw) pixel_tail(hw, sum_lanes(pixel_lanes(hw)));
    }
  });
  sum_partials<A>(pp, B, nch, C, r.per_channel);
  if constexpr (kPairs) from_pair_order<T>(r.per_channel, B, C);
}

template <typename T, typename Q, typename A = typename AccT<T>::type>
void reduce_both_axes(const T* grad_out, const T* x, const Shape& s, const BothAxes<A>& r, const Q& q) {
  if (s.channels_last) {
    reduce_both_axes_channels_last<T, Q, A>(grad_out, x, s, r, q);
  } else {
    reduce_both_axes_nchw<T, Q, A>(grad_out, x, s, r, q);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace attnkern
