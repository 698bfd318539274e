// Direct "same" 2-D correlation of a few channels, for the attention blocks' small convolutions
// that oneDNN runs at a few percent of the CPU's multiply-add rate (CBAM's spatial convolution,
// csrc/spatial_conv.cpp; BAM's dilated convolutions, csrc/dilated_conv.cpp):
//
//   out[b, o, y, x] = bias[o] + sum over c < n_in, i, j < k of
//                     taps[o][c][i][j] * in[b, c, y + d * i - p, x + d * j - p]
//
// with k odd, dilation d, p = d * (k / 2) and zeros outside the map.
//
// A task is an image's block of kRowBlock output rows. It copies the input rows it reads into a
// zero-padded buffer in the accumulation dtype, which turns the padding into plain loads; each
// output vector (pixels along a row) then takes one multiply-add per tap from unaligned loads of
// that buffer, kVecBlock vectors sharing each tap's broadcast. The input gradient is the same
// correlation with the taps flipped and their channel axes swapped; the weight's gradient is one
// dot product per tap per task, the tasks' partials summed in task order, so every result is
// deterministic. Included by the kernel sources only, once per vector ISA.
#pragma once

#include <algorithm>

#include "common.h"
#include "scratch.h"

namespace attnkern {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kRowBlock = 16;  // output rows per task

// Vector registers of the ISA a copy is built for: 32 with AVX-512, 16 below it.
template <typename A>
inline constexpr int kVecRegs = Vectorized<A>::size() * sizeof(A) >= 64 ? 32 : 16;
// The forward's register block: kOutBlock output channels x kVecBlock output vectors of
// accumulators, so that each input load feeds kOutBlock multiply-adds, each weight broadcast
// kVecBlock, and 16 (AVX-512) or 8 independent accumulation chains hide the multiply-add's latency.
constexpr int kOutBlock = 4;
template <typename A>
inline constexpr int kVecBlock = kVecRegs<A> == 32 ? 4 : 2;
// The weight gradient's register block for k x k taps: kGradOutBlock output channels x K
// horizontal taps of accumulators, their gradient rows' vectors and one input vector in registers.
template <typename A, int K>
inline constexpr int kGradOutBlock = std::max(1, std::min(4, (kVecRegs<A> - 4) / (K + 1)));

// A [B, N, H, W] map read through its strides (any layout).
template <typename T>
struct Map {
  const T* data;
  int64_t sb, sc, sh, sw;
  inline const T* row(int64_t b, int64_t c, int64_t y) const { return data + b * sb + c * sc + y * sh; }
};

template <typename T>
Map<T> map_of(const Tensor& t) {
  return Map<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The geometry of a correlation: k x k taps, dilation d, "same" padding p.
struct Window {
  int64_t k, d;
  int64_t pad() const { return d * (k / 2); }
};

// width of a padded row for W output columns and padding p: the last vector block's loads end
// inside it
inline int64_t padded_width(int64_t W, int64_t p, int64_t L) { return ceil_div(W, L) * L + 2 * p; }

// Copies rows y0 - p .. y0 + rows + p - 1 of the n channels of image b of `in` into a buffer
// from `scratch` (see correlate_rows), zeros outside the map, and returns it; a row holds
// columns -p .. W + p - 1, then zeros up to `width`.
template <typename T, typename A>
A* pad_rows(const Map<T>& in, int64_t b, int64_t n, int64_t H, int64_t W, int64_t y0, int64_t rows, int64_t p,
            int64_t width, Scratch<A>& scratch) {
  const int64_t R = rows + 2 * p;
  A* buf = scratch.zeros(n * R * width);
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t y = y0 - p + r;
      if (y < 0 || y >= H) continue;
      A* dst = buf + (c * R + r) * width + p;
      const T* src = in.row(b, c, y);
      if (in.sw == 1) {
        for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<A>(src[x]);
      } else {
        for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<A>(src[x * in.sw]);
      }
    }
  }
  return buf;
}

// lines[o][col .. col + NV * L) for padded row r and the OB output channels o0 .. o0 + OB - 1
// (taps_o0 = their first one's taps, bias_o0 their biases or null): one multiply-add per tap,
// output channel and vector; each input vector loaded once for the OB channels, each tap's
// broadcast shared by the NV vectors.
template <int OB, int NV, typename A>
inline void correlate_vectors(const A* buf, int64_t n_in, int64_t R, int64_t width, const A* taps_o0, Window win,
                              int64_t r, int64_t col, const A* bias_o0, A* lines, int64_t line_stride) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t k = win.k, d = win.d, per_o = n_in * k * k;
  V acc[OB][NV];
  for (int o = 0; o < OB; ++o)
    for (int u = 0; u < NV; ++u) acc[o][u] = V(bias_o0 ? bias_o0[o] : A(0));
  for (int64_t c = 0; c < n_in; ++c) {
    for (int64_t i = 0; i < k; ++i) {
      const A* src = buf + (c * R + r + i * d) * width + col;
      const A* ti = taps_o0 + (c * k + i) * k;
      for (int64_t j = 0; j < k; ++j) {
        V in[NV];
        for (int u = 0; u < NV; ++u) in[u] = V::loadu(src + u * L + j * d);
        for (int o = 0; o < OB; ++o) {
          const V wv(ti[o * per_o + j]);
          for (int u = 0; u < NV; ++u) acc[o][u] = at::vec::fmadd(wv, in[u], acc[o][u]);
        }
      }
    }
  }
  for (int o = 0; o < OB; ++o)
    for (int u = 0; u < NV; ++u) acc[o][u].store(lines + o * line_stride + col + u * L);
}

// out[b, o0 + o, y, :] for o < OB and the task's rows y0 .. y0 + rows - 1 (see correlate_rows),
// through `lines` (OB rows of nvec * L).
template <int OB, typename T, typename A>
void correlate_channel_block(const A* buf, int64_t n_in, int64_t rows, int64_t width, const A* taps,
                             const A* bias, int64_t o0, Window win, int64_t W, T* out, int64_t ob, int64_t oc,
                             int64_t oh, int64_t ow, int64_t b, int64_t y0, A* lines) {
  constexpr int64_t L = Vectorized<A>::size();
  constexpr int NV = kVecBlock<A>;
  const int64_t k = win.k, R = rows + 2 * win.pad(), nvec = ceil_div(W, L), stride = nvec * L;
  const A* taps_o0 = taps + o0 * n_in * k * k;
  const A* bias_o0 = bias ? bias + o0 : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t v = 0;
    for (; v + NV <= nvec; v += NV)
      correlate_vectors<OB, NV, A>(buf, n_in, R, width, taps_o0, win, r, v * L, bias_o0, lines, stride);
    if constexpr (NV > 2) {
      for (; v + 2 <= nvec; v += 2)
        correlate_vectors<OB, 2, A>(buf, n_in, R, width, taps_o0, win, r, v * L, bias_o0, lines, stride);
    }
    for (; v < nvec; ++v)
      correlate_vectors<OB, 1, A>(buf, n_in, R, width, taps_o0, win, r, v * L, bias_o0, lines, stride);
    for (int o = 0; o < OB; ++o) {
      const A* line = lines + o * stride;
      T* dst = out + b * ob + (o0 + o) * oc + (y0 + r) * oh;
      if (ow == 1) {
        for (int64_t x = 0; x < W; ++x) dst[x] = static_cast<T>(line[x]);
      } else {
        for (int64_t x = 0; x < W; ++x) dst[x * ow] = static_cast<T>(line[x]);
      }
    }
  }
}

// out[b, o, y, :] for the task's rows y0 .. y0 + rows - 1 and every output channel o < n_out:
// the correlation of the padded rows (n_in channels) with taps[o][c][i * k + j], plus bias[o]
// (none when bias is null), written through the output's strides as T; kOutBlock output
// channels at a time.
template <typename T, typename A>
void correlate_rows(const A* buf, int64_t n_in, int64_t rows, int64_t width, const A* taps, const A* bias,
                    int64_t n_out, Window win, int64_t W, T* out, int64_t ob, int64_t oc, int64_t oh, int64_t ow,
                    int64_t b, int64_t y0, Scratch<A>& line_scratch) {
  constexpr int64_t L = Vectorized<A>::size();
  A* lines = line_scratch.get(kOutBlock * ceil_div(W, L) * L);
  static_assert(kOutBlock == 4, "the switch below takes the remainders 1 to 3");
  int64_t o0 = 0;
  for (; o0 + kOutBlock <= n_out; o0 += kOutBlock)
    correlate_channel_block<kOutBlock, T, A>(buf, n_in, rows, width, taps, bias, o0, win, W, out, ob, oc, oh, ow, b,
                                             y0, lines);
  switch (n_out - o0) {
    case 3:
      correlate_channel_block<3, T, A>(buf, n_in, rows, width, taps, bias, o0, win, W, out, ob, oc, oh, ow, b, y0,
                                       lines);
      break;
    case 2:
      correlate_channel_block<2, T, A>(buf, n_in, rows, width, taps, bias, o0, win, W, out, ob, oc, oh, ow, b, y0,
                                       lines);
      break;
    case 1:
      correlate_channel_block<1, T, A>(buf, n_in, rows, width, taps, bias, o0, win, W, out, ob, oc, oh, ow, b, y0,
                                       lines);
      break;
    default:
      break;
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

// out [B, n_out, H, W] = correlate(in, taps) + bias over every task (see correlate_rows).
template <typename T, typename A>
void correlate(const Map<T>& in, int64_t n_in, const A* taps, const A* bias, int64_t n_out, Window win, int64_t B,
               int64_t H, int64_t W, Tensor& out) {
  constexpr int64_t L = Vectorized<A>::size();
  const int64_t p = win.pad(), width = padded_width(W, p, L);
  const Tasks tasks(B, H);
  T* o = out.data_ptr<T>();
  const int64_t ob = out.stride(0), oc = out.stride(1), oh = out.stride(2), ow = out.stride(3);
  at::parallel_for(0, tasks.count(), 1, [&](int64_t t0, int64_t t1) {
    Scratch<A> buf, lines;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = tasks.image(t), y0 = tasks.first_row(t), rows = tasks.rows(t);
      const A* padded = pad_rows<T, A>(in, b, n_in, H, W, y0, rows, p, width, buf);
      correlate_rows<T, A>(padded, n_in, rows, width, taps, bias, n_out, win, W, o, ob, oc, oh, ow, b, y0, lines);
    }
  });
}

// The task's partial sums of the weight gradient (see weight_grad) for the OB output channels
// o0 .. o0 + OB - 1, input channel c and tap row i, K = k taps across: for each vector of each
// row, the OB gradient vectors and the K shifted input vectors are loaded once, for OB x K
// multiply-adds into as many accumulators. K = 0: any k, one tap at a time.
template <int OB, int K, typename A>
void weight_grad_taps(const A* gbuf, const A* sbuf, int64_t rows, int64_t nvec, int64_t width, int64_t R, Window win,
                      int64_t n_in, int64_t o0, int64_t c, int64_t i, A* out) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t k = win.k, d = win.d;
  const A* s_ci = sbuf + (c * R + i * d) * width;
  if constexpr (K == 0) {
    for (int64_t o = o0; o < o0 + OB; ++o) {
      const A* go = gbuf + o * rows * nvec * L;
      for (int64_t j = 0; j < k; ++j) {
        V acc0(0), acc1(0);
        for (int64_t r = 0; r < rows; ++r) {
          const A* gr = go + r * nvec * L;
          const A* sr = s_ci + r * width + j * d;
          int64_t v = 0;
          for (; v + 2 <= nvec; v += 2) {
            acc0 = at::vec::fmadd(V::loadu(gr + v * L), V::loadu(sr + v * L), acc0);
            acc1 = at::vec::fmadd(V::loadu(gr + (v + 1) * L), V::loadu(sr + (v + 1) * L), acc1);
          }
          if (v < nvec) acc0 = at::vec::fmadd(V::loadu(gr + v * L), V::loadu(sr + v * L), acc0);
        }
        out[((o * n_in + c) * k + i) * k + j] = sum_lanes(acc0 + acc1);
      }
    }
  } else {
    V acc[OB][K];
    for (int o = 0; o < OB; ++o)
      for (int j = 0; j < K; ++j) acc[o][j] = V(0);
    for (int64_t r = 0; r < rows; ++r) {
      const A* sr = s_ci + r * width;
      for (int64_t v = 0; v < nvec; ++v) {
        V gv[OB];
        for (int o = 0; o < OB; ++o) gv[o] = V::loadu(gbuf + ((o0 + o) * rows + r) * nvec * L + v * L);
        for (int j = 0; j < K; ++j) {
          const V sv = V::loadu(sr + v * L + j * d);
          for (int o = 0; o < OB; ++o) acc[o][j] = at::vec::fmadd(gv[o], sv, acc[o][j]);
        }
      }
    }
    for (int o = 0; o < OB; ++o)
      for (int j = 0; j < K; ++j) out[(((o0 + o) * n_in + c) * k + i) * k + j] = sum_lanes(acc[o][j]);
  }
}

// weight_grad_taps for every output channel, input channel and tap row, kGradOutBlock output
// channels at a time (then one at a time), K = k or 0 for a k without its own copy.
template <int K, typename A>
void weight_grad_task(const A* gbuf, const A* sbuf, int64_t rows, int64_t nvec, int64_t width, int64_t R, Window win,
                      int64_t n_out, int64_t n_in, A* out) {
  constexpr int OB = K == 0 ? 1 : kGradOutBlock<A, K>;
  for (int64_t c = 0; c < n_in; ++c) {
    for (int64_t i = 0; i < win.k; ++i) {
      int64_t o0 = 0;
      for (; o0 + OB <= n_out; o0 += OB)
        weight_grad_taps<OB, K, A>(gbuf, sbuf, rows, nvec, width, R, win, n_in, o0, c, i, out);
      for (; o0 < n_out; ++o0) weight_grad_taps<1, K, A>(gbuf, sbuf, rows, nvec, width, R, win, n_in, o0, c, i, out);
    }
  }
}

// grad_w[o, c, i, j] = sum over b, y, x of g[b, o, y, x] * s[b, c, y + d * i - p, x + d * j - p]
// (n_out x n_in x k x k, in that order) and, when grad_bias is not null, grad_bias[o] = sum of
// g[b, o]: per task, vector dot products over the task's rows (g's rows zero past column W, so
// the padded lanes add nothing; weight_grad_task), lanes summed, then the tasks' partials summed
// in task order.
template <typename T, typename A>
void weight_grad(const Map<T>& g, int64_t n_out, const Map<T>& s, int64_t n_in, Window win, int64_t B, int64_t H,
                 int64_t W, A* grad_w, A* grad_bias) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t k = win.k, p = win.pad();
  const int64_t width = padded_width(W, p, L), nvec = ceil_div(W, L), taps = n_out * n_in * k * k;
  const int64_t per_task = taps + (grad_bias ? n_out : 0);
  const Tasks tasks(B, H);
  Scratch<A> partials;
  A* partial = partials.get(tasks.count() * per_task);
  at::parallel_for(0, tasks.count(), 1, [&](int64_t t0, int64_t t1) {
    Scratch<A> sbuf, gbuf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = tasks.image(t), y0 = tasks.first_row(t), rows = tasks.rows(t), R = rows + 2 * p;
      const A* sb = pad_rows<T, A>(s, b, n_in, H, W, y0, rows, p, width, sbuf);
      const A* gb = pad_rows<T, A>(g, b, n_out, H, W, y0, rows, 0, nvec * L, gbuf);
      A* out = partial + t * per_task;
      switch (k) {
        case 1: weight_grad_task<1, A>(gb, sb, rows, nvec, width, R, win, n_out, n_in, out); break;
        case 3: weight_grad_task<3, A>(gb, sb, rows, nvec, width, R, win, n_out, n_in, out); break;
        case 5: weight_grad_task<5, A>(gb, sb, rows, nvec, width, R, win, n_out, n_in, out); break;
        case 7: weight_grad_task<7, A>(gb, sb, rows, nvec, width, R, win, n_out, n_in, out); break;
        default: weight_grad_task<0, A>(gb, sb, rows, nvec, width, R, win, n_out, n_in, out); break;
      }
      for (int64_t o = 0; grad_bias && o < n_out; ++o) {
        const A* go = gb + o * rows * nvec * L;
        V acc(0);
        for (int64_t v = 0; v < rows * nvec; ++v) acc = acc + V::loadu(go + v * L);
        out[taps + o] = sum_lanes(acc);
      }
    }
  });
  std::fill_n(grad_w, taps, A(0));
  if (grad_bias) std::fill_n(grad_bias, n_out, A(0));
  for (int64_t t = 0; t < tasks.count(); ++t) {
    const A* src = partial + t * per_task;
    for (int64_t q = 0; q < taps; ++q) grad_w[q] += src[q];
    for (int64_t o = 0; grad_bias && o < n_out; ++o) grad_bias[o] += src[taps + o];
  }
}

// The taps of w [n_out, n_in, k, k] in the accumulation dtype, as a contiguous tensor: as they
// are (taps[((o * n_in + c) * k + i) * k + j]), or for the input gradient, channel axes swapped and
// flipped (taps[((c * n_out + o) * k + i) * k + j] = w[o, c, k - 1 - i, k - 1 - j]).
template <typename A>
Tensor taps_of(const Tensor& weight, bool for_input_grad) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const Tensor w = weight.to(acc);
  return (for_input_grad ? w.flip({2, 3}).transpose(0, 1) : w).contiguous();
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace attnkern
