// What every CPU kernel of attnkern shares: vector loads and stores in the accumulation dtype,
// max pooling with a tie count, the argument checks, and the fixed task sizes.
//
// Every kernel streams the big tensor(s) once, contiguously, in either layout the caller hands
// over without a copy: NCHW (each channel's H*W pixels contiguous) or channels_last (each
// pixel's C channels contiguous); each primitive is a pair of loops, one per layout, under one
// checked entry. Inner loops are at::vec::Vectorized over the contiguous dimension; each
// kernel source is compiled once per vector ISA (baseline, AVX2, AVX-512, AVX-512 with BF16) and
// the widest one the CPU runs is chosen at run time (cpu_capability.h); bf16/fp16 are widened to
// fp32 in registers; all arithmetic is in the accumulation dtype (fp32, fp64 for fp64 input).
// Vector widths differ between ISAs, so the order of a reduction's additions (not its
// determinism) depends on the ISA.
//
// Determinism: work is split into tasks that depend only on the shapes (never on the thread
// count); reductions that cross tasks write per-task partials that are combined in a fixed
// order afterwards. No atomics. Offsets are int64_t throughout.
//
// Max pooling keeps a tie count (the number of elements equal to the max), so gradients are
// shared between equal maxima the way torch.amax shares them.
//
// Each family file (statistics.cpp, gate.cpp, bam.cpp) defines its ops' schemas in the
// `attnkern` namespace (a fragment: the namespace is shared with ops defined from Python) and
// registers its kernels for the CPU dispatch key (in the baseline build; the dispatcher calls
// the active ISA's copy). attnkern/ops/gating.py adds the CUDA (Triton)
// kernels, the reference for other devices, the fake kernels and the autograd formulas, and
// defines the same schemas itself when this library is not built. Names say what is computed:
// `*_backward` gives the gradients of a primitive's small inputs (gates, logits),
// `*_input_grad` the gradient of a block's big input x, written once from every term.
#pragma once

#include "cpu_capability.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <type_traits>

namespace attnkern {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per vector ISA (cpu_capability.h)

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
  // the first `count` (< kStep) elements, zeros after them
  static inline void load_partial(const T* p, int64_t count, V& a, V& b) {
    constexpr int64_t L = V::size();
    a = V::loadu(p, std::min(count, L));
    b = count > L ? V::loadu(p + L, count - L) : V(0);
  }
};

// The first `count` (< 16) 16-bit elements at p as a 256-bit vector, zeros after them, for the
// AVX2 copy: at::vec's partial load of a bfloat16/half vector copies through a stack buffer with
// a memcpy of variable length (a library call for each row's last step). Whole 32-bit pairs
// come in one masked load; an odd last element is read on its own, so nothing past p[count - 1]
// is touched. (AVX-512: at::vec's partial load is already one masked load.)
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
inline __m256i load_first_u16(const void* p, int64_t count) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i words = _mm256_set1_epi32(static_cast<int>(count / 2));
  __m256i v = _mm256_maskload_epi32(static_cast<const int*>(p), _mm256_cmpgt_epi32(words, lane));
  if (count & 1) {
    const int last = static_cast<const uint16_t*>(p)[count - 1];
    v = _mm256_blendv_epi8(v, _mm256_set1_epi32(last), _mm256_cmpeq_epi32(words, lane));
  }
  return v;
}
#endif

// The first `count` (< its size) elements of a vector of a 16-bit type T at p, zeros after them.
template <typename T>
inline Vectorized<T> load_first(const T* p, int64_t count) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  return Vectorized<T>(load_first_u16(p, count));
#else
  return Vectorized<T>::loadu(p, count);
#endif
}

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
  static inline void load_partial(const T* p, int64_t count, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(load_first(p, count));
  }
};
#if defined(CPU_CAPABILITY_AVX512_BF16)
// The AVX512_BF16 copy rounds a store's 32 floats to bfloat16 in one instruction
// (VCVTNE2PS2BF16), where at::vec's conversion takes 16: the bfloat16 passes that write a big
// tensor were bound by it. Both round to nearest even. The instruction also flushes subnormal
// floats (below 1.2e-38) to zero, and writes a NaN as a quiet NaN of the same sign where at::vec
// writes 0xFFFF; a row's tail, stored element by element, keeps c10's rounding.
template <>
struct IO<at::BFloat16> : IOReduced<at::BFloat16> {
  static inline void store(at::BFloat16* p, const V& a, const V& b) {
    _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
  }
};
#else
template <>
struct IO<at::BFloat16> : IOReduced<at::BFloat16> {};
#endif
template <>
struct IO<at::Half> : IOReduced<at::Half> {};

// bfloat16 widened in element pairs, for passes that reduce rows (where a lane holds which
// element matters only to the per-element operands and accumulators, which are then kept in
// the same order: pair_slot): the even elements of p[0..kStep) in a, the odd ones in b. A
// bfloat16 is the top half of its float32, so this takes a shift and a mask, where at::vec's
// widening in element order takes five instructions, three of them shuffles. load_pairs_partial loads the first `count` elements, zeros after them: a holds
// (count + 1) / 2 of them, b count / 2, each from lane 0 on.
template <typename T>
inline constexpr bool kPairLoads = false;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <>
inline constexpr bool kPairLoads<at::BFloat16> = true;
#if defined(CPU_CAPABILITY_AVX512)
inline void split_pairs(__m512i v, Vectorized<float>& a, Vectorized<float>& b) {
  a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else
inline void split_pairs(__m256i v, Vectorized<float>& a, Vectorized<float>& b) {
  a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#endif
inline void load_pairs(const at::BFloat16* p, Vectorized<float>& a, Vectorized<float>& b) {
  split_pairs(Vectorized<at::BFloat16>::loadu(p), a, b);
}
inline void load_pairs_partial(const at::BFloat16* p, int64_t count, Vectorized<float>& a, Vectorized<float>& b) {
  split_pairs(load_first(p, count), a, b);
}
#endif

// Pair order: where a buffer of per-element accumulators that load_pairs steps fill (each
// step's a, then its b, stored from the step's offset on) holds element i of a segment of n:
// a step of kStep elements (the last one may be shorter, `size`) keeps its (size + 1) / 2 even
// elements first and its odd ones after them. The identity when T is not loaded in pairs.
template <typename T>
inline int64_t pair_slot(int64_t i, int64_t n) {
  if constexpr (!kPairLoads<T>) {
    return i;
  } else {
    constexpr int64_t S = IO<T>::kStep;
    const int64_t r = i & (S - 1), base = i - r, half = (std::min(S, n - base) + 1) / 2;
    return base + (r & 1) * half + (r >> 1);
  }
}

// One step of a row, kStep elements of T from p, as two vectors of its accumulation type: in
// pairs where T is loaded in pairs (load_pairs) and kPairs allows it, in element order
// otherwise (IO<T>::load). load_step_partial: the first `count` (< kStep) elements, zeros
// after them.
template <typename T, bool kPairs = kPairLoads<T>, typename V>
inline void load_step(const T* p, V& a, V& b) {
  if constexpr (kPairs && kPairLoads<T>) {
    load_pairs(p, a, b);
  } else {
    IO<T>::load(p, a, b);
  }
}
template <typename T, bool kPairs = kPairLoads<T>, typename V>
inline void load_step_partial(const T* p, int64_t count, V& a, V& b) {
  if constexpr (kPairs && kPairLoads<T>) {
    load_pairs_partial(p, count, a, b);
  } else {
    IO<T>::load_partial(p, count, a, b);
  }
}

// A row's last partial step of `rest` (< kStep) elements of T: its first vector holds rest0 of
// them, its second rest1 (in pairs, the even elements then the odd ones; in element order, the
// first L then the others). A buffer of per-element values in pair_slot order holds the step's
// rest0 values, then its rest1 values: load and store move them to and from two vectors,
// zeros past them.
template <typename T, bool kPairs = kPairLoads<T>>
struct RestSplit {
  using A = typename AccT<T>::type;
  using V = Vectorized<A>;
  int64_t rest0, rest1;
  explicit RestSplit(int64_t rest)
      : rest0(kPairs && kPairLoads<T> ? (rest + 1) / 2 : std::min<int64_t>(rest, V::size())), rest1(rest - rest0) {}
  inline void load(const A* q, V& v0, V& v1) const {
    v0 = V::loadu(q, rest0);
    v1 = rest1 > 0 ? V::loadu(q + rest0, rest1) : V(0);
  }
  inline void store(A* q, const V& v0, const V& v1) const {
    v0.store(q, rest0);
    if (rest1 > 0) v1.store(q + rest0, rest1);
  }
};

// A per-element operand of rows loaded in pairs, [rows, n] from v, each row put in pair order
// (element i at pair_slot<T>(i, n)) so that its vector loads line up with the rows' lanes;
// `storage` keeps the copy. v itself when T is not loaded in pairs. A whole step is one
// deinterleave of two vectors, a row's rest element by element (copied element by element
// with pair_slot's arithmetic, a [B, H*W] operand cost a quarter of an NCHW
// spatial_stats_backward at 4x64x56x56).
template <typename T, typename A>
inline const A* in_pair_order(const A* v, int64_t rows, int64_t n, Tensor& storage) {
  if constexpr (!kPairLoads<T>) {
    return v;
  } else {
    using V = Vectorized<A>;
    constexpr int64_t L = V::size();
    constexpr int64_t S = IO<T>::kStep;
    storage = at::empty({rows, n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
    A* d = storage.data_ptr<A>();
    for (int64_t r = 0; r < rows; ++r) {
      const A* src = v + r * n;
      A* dst = d + r * n;
      int64_t i = 0;
      for (; i + S <= n; i += S) {
        const auto [even, odd] = at::vec::deinterleave2(V::loadu(src + i), V::loadu(src + i + L));
        even.store(dst + i);
        odd.store(dst + i + L);
      }
      for (; i < n; ++i) dst[pair_slot<T>(i, n)] = src[i];
    }
    return d;
  }
}

// [rows, n] per-element results at v, each row in pair order, back into element order in place.
template <typename T, typename A>
inline void from_pair_order(A* v, int64_t rows, int64_t n) {
  if constexpr (kPairLoads<T>) {
    using V = Vectorized<A>;
    constexpr int64_t L = V::size();
    constexpr int64_t S = IO<T>::kStep;
    for (int64_t r = 0; r < rows; ++r) {
      A* row = v + r * n;
      int64_t i = 0;
      for (; i + S <= n; i += S) {
        const auto [first, second] = at::vec::interleave2(V::loadu(row + i), V::loadu(row + i + L));
        first.store(row + i);
        second.store(row + i + L);
      }
      A rest[S];
      std::copy(row + i, row + n, rest);
      for (int64_t j = i; j < n; ++j) row[j] = rest[pair_slot<T>(j, n) - i];
    }
  }
}

// An operand of a segment loop: one value per element of the segment (`vec`), or one value
// for the whole segment (`vec == nullptr`, then `scalar`).
template <typename A>
struct Operand {
  const A* vec = nullptr;
  A scalar = A(0);
  inline Vectorized<A> load(int64_t j) const {
    return vec ? Vectorized<A>::loadu(vec + j) : Vectorized<A>(scalar);
  }
  inline A at(int64_t j) const { return vec ? vec[j] : scalar; }
};

template <typename A>
inline Operand<A> along(const A* p) {
  return Operand<A>{p, A(0)};
}
template <typename A>
inline Operand<A> fixed(A s) {
  return Operand<A>{nullptr, s};
}

// ---------------------------------------------------------------------------------------
// max with tie count
// ---------------------------------------------------------------------------------------

template <typename A>
inline void max_count_add(A& mx, A& cnt, A v) {
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
inline void max_count_merge(A& mx, A& cnt, A m2, A c2) {
  if (m2 > mx) {
    mx = m2;
    cnt = c2;
  } else if (m2 == mx) {
    cnt += c2;
  } else if (std::isnan(m2)) {
    mx = m2;
  }
}

// (vmx, vcnt) <- the running max and tie count with v, lane by lane. NaN does NOT propagate
// here: a pass over a row is bound by this update (a sum, then this, per vector), and at::vec's
// NaN-propagating maximum and its mask-as-vector comparisons made it 12 AVX-512 instructions where
// mask registers need 5. A NaN element makes the pass's sum NaN, and every pass then takes its
// max from `first_nan` (a rescan, only when the sum is NaN). Without NaN the results are
// bitwise those of the NaN-propagating update.
template <typename V>
inline void max_count_add_vec(V& vmx, V& vcnt, const V& v) {  // the baseline copy: plain loops
  const V one(1);
  const V gt = v > vmx;
  const V eq = v == vmx;
  vcnt = V::blendv(vcnt + (eq & one), one, gt);
  vmx = at::vec::maximum(vmx, v);
}

#if defined(CPU_CAPABILITY_AVX512)
inline void max_count_add_vec(Vectorized<float>& vmx, Vectorized<float>& vcnt, const Vectorized<float>& v) {
  const __m512 m = vmx, x = v, one = _mm512_set1_ps(1.f);
  const __mmask16 gt = _mm512_cmp_ps_mask(x, m, _CMP_GT_OQ), eq = _mm512_cmp_ps_mask(x, m, _CMP_EQ_OQ);
  const __m512 c = _mm512_mask_add_ps(vcnt, eq, vcnt, one);
  vcnt = _mm512_mask_mov_ps(c, gt, one);
  vmx = _mm512_max_ps(m, x);
}
inline void max_count_add_vec(Vectorized<double>& vmx, Vectorized<double>& vcnt, const Vectorized<double>& v) {
  const __m512d m = vmx, x = v, one = _mm512_set1_pd(1.);
  const __mmask8 gt = _mm512_cmp_pd_mask(x, m, _CMP_GT_OQ), eq = _mm512_cmp_pd_mask(x, m, _CMP_EQ_OQ);
  const __m512d c = _mm512_mask_add_pd(vcnt, eq, vcnt, one);
  vcnt = _mm512_mask_mov_pd(c, gt, one);
  vmx = _mm512_max_pd(m, x);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void max_count_add_vec(Vectorized<float>& vmx, Vectorized<float>& vcnt, const Vectorized<float>& v) {
  const __m256 m = vmx, x = v, one = _mm256_set1_ps(1.f);
  const __m256 gt = _mm256_cmp_ps(x, m, _CMP_GT_OQ), eq = _mm256_cmp_ps(x, m, _CMP_EQ_OQ);
  vcnt = _mm256_blendv_ps(_mm256_add_ps(vcnt, _mm256_and_ps(eq, one)), one, gt);
  vmx = _mm256_max_ps(m, x);
}
inline void max_count_add_vec(Vectorized<double>& vmx, Vectorized<double>& vcnt, const Vectorized<double>& v) {
  const __m256d m = vmx, x = v, one = _mm256_set1_pd(1.);
  const __m256d gt = _mm256_cmp_pd(x, m, _CMP_GT_OQ), eq = _mm256_cmp_pd(x, m, _CMP_EQ_OQ);
  vcnt = _mm256_blendv_pd(_mm256_add_pd(vcnt, _mm256_and_pd(eq, one)), one, gt);
  vmx = _mm256_max_pd(m, x);
}
#endif

// The first NaN among y_k = p[k * stride] * scale[k] (scale[k] = 1 when scale is null),
// k = 0..n-1, if any. A pass whose sum came out NaN calls this to decide its max: NaN when an
// element was NaN (as torch.amax), the vector max otherwise (the sum was inf - inf).
template <typename T, typename A>
inline std::optional<A> first_nan(const T* p, int64_t stride, const A* scale, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const A y = static_cast<A>(p[k * stride]) * (scale ? scale[k] : A(1));
    if (std::isnan(y)) return y;
  }
  return std::nullopt;
}

// (m, c) <- the max and tie count of the pairs (m, c) and (m2, c2), lane by lane.
template <typename V>
inline void max_count_merge_vec(V& m, V& c, const V& m2, const V& c2) {
  const V gt = m2 > m;
  const V eq = m2 == m;
  c = V::blendv(c + (eq & c2), c2, gt);
  m = at::vec::maximum(m, m2);  // NaN propagates
}

#ifdef CPU_CAPABILITY_DEFAULT  // at::vec's "vectors" are arrays here: plain loops

template <typename A>
inline A sum_lanes(const Vectorized<A>& v) {
  constexpr int64_t L = Vectorized<A>::size();
  A s[L];
  v.store(s);
  A r = 0;
  for (int64_t l = 0; l < L; ++l) r += s[l];
  return r;
}

template <typename A>
inline void merge_lanes(const Vectorized<A>& vmx, const Vectorized<A>& vcnt, A& mx, A& cnt) {
  constexpr int64_t L = Vectorized<A>::size();
  A m[L], c[L];
  vmx.store(m);
  vcnt.store(c);
  for (int64_t l = 0; l < L; ++l) max_count_merge(mx, cnt, m[l], c[l]);
}

#else  // vector shuffles (at::vec::vec_reduce_all)

template <typename A>
inline A sum_lanes(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return a + b; }, v);
}

// Merges the lanes' (max, tie count) into (mx, cnt): the max of the lanes, and the counts of
// the lanes that hold it (none when it is NaN).
template <typename A>
inline void merge_lanes(const Vectorized<A>& vmx, const Vectorized<A>& vcnt, A& mx, A& cnt) {
  using V = Vectorized<A>;
  const A m = at::vec::vec_reduce_all<A>([](const V& a, const V& b) { return at::vec::maximum(a, b); }, vmx);
  max_count_merge(mx, cnt, m, sum_lanes<A>(vcnt & (vmx == V(m))));
}

#endif

// ---------------------------------------------------------------------------------------
// lane merges of a group of rows at once
// ---------------------------------------------------------------------------------------

// Passes whose rows are short (channels_last, one pixel's C channels) merge each row's vector
// lanes on their own: sum_lanes and merge_lanes take four shuffle steps per row (three under
// AVX2), against 2 to 16 vector steps over the row itself for C = 64 to 512 floats.
// merge_lanes_of_rows merges the lanes of kLaneGroup rows at once, one output lane per row: a
// step shuffles the halves of two rows' vectors into one, so 16 rows take 15 combines instead
// of 64. Lanes are paired as vec_reduce_all pairs them (i with i + L/2, then i + L/4, ...), the
// lower lane first, so each row's sum, max and tie count are bitwise those of sum_lanes and
// merge_lanes: a row gives the same result in a group or alone.
template <typename A>
inline constexpr int kLaneGroup = 1;  // no group merge: double, and the baseline copy

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline constexpr int kLaneGroup<float> = 16;
using LaneVec = __m512;

// Step `level` of the lane tree for two vectors x, y: lo gets the lower lane of each pair,
// hi the upper; level 0 pairs lanes i and i + 8 of each row, level 3 lanes i and i + 1.
template <int level>
inline void split_lane_pairs(__m512 x, __m512 y, __m512& lo, __m512& hi) {
  if constexpr (level == 0) {
    lo = _mm512_shuffle_f32x4(x, y, 0x44);
    hi = _mm512_shuffle_f32x4(x, y, 0xEE);
  } else if constexpr (level == 1) {
    lo = _mm512_shuffle_f32x4(x, y, 0x88);
    hi = _mm512_shuffle_f32x4(x, y, 0xDD);
  } else if constexpr (level == 2) {
    lo = _mm512_shuffle_ps(x, y, 0x44);
    hi = _mm512_shuffle_ps(x, y, 0xEE);
  } else {
    lo = _mm512_shuffle_ps(x, y, 0x88);
    hi = _mm512_shuffle_ps(x, y, 0xDD);
  }
}
constexpr int kLaneTreeLevels = 4;
// after the last level, lane 4q + t holds row 4t + q
inline constexpr int lane_tree_row(int lane) { return 4 * (lane % 4) + lane / 4; }

#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline constexpr int kLaneGroup<float> = 8;
using LaneVec = __m256;

template <int level>
inline void split_lane_pairs(__m256 x, __m256 y, __m256& lo, __m256& hi) {
  if constexpr (level == 0) {
    lo = _mm256_permute2f128_ps(x, y, 0x20);
    hi = _mm256_permute2f128_ps(x, y, 0x31);
  } else if constexpr (level == 1) {
    lo = _mm256_shuffle_ps(x, y, 0x44);
    hi = _mm256_shuffle_ps(x, y, 0xEE);
  } else {
    lo = _mm256_shuffle_ps(x, y, 0x88);
    hi = _mm256_shuffle_ps(x, y, 0xDD);
  }
}
constexpr int kLaneTreeLevels = 3;
// after the last level, lane 4h + t holds row 2t + h
inline constexpr int lane_tree_row(int lane) { return 2 * (lane % 4) + lane / 4; }
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <int level, int G>
inline void sum_lane_level(Vectorized<float>* s) {
  for (int j = 0; j < (G >> level) / 2; ++j) {
    LaneVec lo, hi;
    split_lane_pairs<level>(s[2 * j], s[2 * j + 1], lo, hi);
    s[j] = Vectorized<float>(lo) + Vectorized<float>(hi);
  }
}

template <int level, int G>
inline void max_count_lane_level(Vectorized<float>* m, Vectorized<float>* c) {
  for (int j = 0; j < (G >> level) / 2; ++j) {
    LaneVec mlo, mhi, clo, chi;
    split_lane_pairs<level>(m[2 * j], m[2 * j + 1], mlo, mhi);
    split_lane_pairs<level>(c[2 * j], c[2 * j + 1], clo, chi);
    Vectorized<float> vm(mlo), vc(clo);
    max_count_merge_vec(vm, vc, Vectorized<float>(mhi), Vectorized<float>(chi));
    m[j] = vm;
    c[j] = vc;
  }
}

template <int G, int... levels>
inline void sum_lane_tree(Vectorized<float>* s, std::integer_sequence<int, levels...>) {
  (sum_lane_level<levels, G>(s), ...);
}
template <int G, int... levels>
inline void max_count_lane_tree(Vectorized<float>* m, Vectorized<float>* c, std::integer_sequence<int, levels...>) {
  (max_count_lane_level<levels, G>(m, c), ...);
}

// sum[k] = sum_lanes(s[k]) for the kLaneGroup rows k (s is overwritten).
inline void sum_lanes_of_rows(Vectorized<float>* s, float* sum) {
  constexpr int G = kLaneGroup<float>;
  sum_lane_tree<G>(s, std::make_integer_sequence<int, kLaneTreeLevels>{});
  float out[G];
  s[0].store(out);
  for (int l = 0; l < G; ++l) sum[lane_tree_row(l)] = out[l];
}

// (mx[k], cnt[k]) = merge_lanes(m[k], c[k]) into (-inf, 0) for the kLaneGroup rows k (m, c are
// overwritten).
inline void merge_lanes_of_rows(Vectorized<float>* m, Vectorized<float>* c, float* mx, float* cnt) {
  constexpr int G = kLaneGroup<float>;
  max_count_lane_tree<G>(m, c, std::make_integer_sequence<int, kLaneTreeLevels>{});
  float om[G], oc[G];
  m[0].store(om);
  c[0].store(oc);
  for (int l = 0; l < G; ++l) {
    const int k = lane_tree_row(l);
    mx[k] = -std::numeric_limits<float>::infinity();
    cnt[k] = 0;
    max_count_merge(mx[k], cnt[k], om[l], oc[l]);
  }
}
#endif

// The tie count stored with a max: no element equals a NaN max, so its count is 0 (as the
// reference's (x == max).sum() and torch.amax's gradient mask).
template <typename A>
inline int32_t tie_count(A mx, A cnt) {
  return std::isnan(mx) ? 0 : static_cast<int32_t>(cnt);
}

// ---------------------------------------------------------------------------------------
// argument checks and shapes
// ---------------------------------------------------------------------------------------

struct Shape {
  int64_t B, C, HW;
  bool channels_last;  // C contiguous per pixel
  at::ScalarType acc;
};

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline Shape check_x(const Tensor& x, const char* fn) {
  TORCH_CHECK(x.defined(), fn, ": x is undefined");
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, fn, ": x must be a 4-D tensor [B, C, H, W], got ", x.dim(), "-D");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, fn,
              ": x must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(x.numel() > 0, fn, ": x must not be empty, got shape ", x.sizes());
  Shape s{x.size(0), x.size(1), x.size(2) * x.size(3), false, acc_type(t)};
  if (x.is_contiguous()) {
    s.channels_last = false;
  } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    s.channels_last = true;
  } else {
    TORCH_CHECK(false, fn, ": x must be NCHW-contiguous or channels_last-contiguous, got strides ",
                x.strides());
  }
  return s;
}

inline void check_big(const Tensor& t, const char* name, const Tensor& x, const Shape& s,
                      const char* fn) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == x.sizes(), fn, ": ", name, " must have x's shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(
      t.is_contiguous(s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
      fn, ": ", name, " must have x's memory format (", s.channels_last ? "channels_last" : "contiguous",
      ")");
}

inline void check_small(const Tensor& t, const char* name, int64_t B, int64_t N,
                        at::ScalarType dtype, const char* fn) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == B * N && t.is_contiguous(), fn, ": ", name,
              " must be a contiguous tensor of ", B, " x ", N, " elements, got shape ", t.sizes());
}

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// A dense [B, N] accumulation-dtype tensor from an optional one, or `fill` when absent.
inline Tensor given_or(const OptTensor& t, const char* name, int64_t B, int64_t N,
                       at::ScalarType acc, double fill, const char* fn) {
  if (given(t)) {
    check_small(*t, name, B, N, acc, fn);
    return *t;
  }
  return at::full({B, N}, fill, at::TensorOptions().dtype(acc));
}

template <typename A>
inline const A* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

// An empty accumulation-dtype tensor: the gradient of a gate that is absent or not asked for.
inline Tensor no_grad_of(const Tensor& x, at::ScalarType acc) {
  return at::empty({0}, x.options().dtype(acc));
}

// out[b, c] = sum over k of part[b, k, c], in order k = 0, 1, ... (deterministic), a vector of
// channels at a time (the same order per channel as one channel at a time).
template <typename A>
void sum_partials(const A* part, int64_t B, int64_t K, int64_t C, A* out) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t kSpan = 4 * L;  // channels per task
  const int64_t spans = (C + kSpan - 1) / kSpan;
  at::parallel_for(0, B * spans, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / spans, c0 = (t % spans) * kSpan, c1 = std::min(C, c0 + kSpan);
      const A* p = part + b * K * C;
      int64_t c = c0;
      for (; c + L <= c1; c += L) {
        V sum(0);
        for (int64_t k = 0; k < K; ++k) sum += V::loadu(p + k * C + c);
        sum.store(out + b * C + c);
      }
      for (; c < c1; ++c) {
        A sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += p[k * C + c];
        out[b * C + c] = sum;
      }
    }
  });
}

// Fixed task sizes: they depend on the shapes only, so results never depend on thread count.
constexpr int64_t kPixBlock = 1024;     // most pixels per task in NCHW cross-channel passes
constexpr int64_t kPixBlockMin = 256;   // fewest

// Pixels per task of an NCHW pass across channels (per task, each channel's row of that many
// pixels is read in turn while per-pixel accumulators stay in L1). Long rows stream: at 256
// pixels the hardware prefetcher restarts every 1 KB and the cross-channel passes ran at a
// third of copy bandwidth; at 1024, about half to two thirds. Small maps get shorter rows so
// that there are tasks for every thread. A function of the shape only: results never depend
// on the thread count.
inline int64_t pix_block(int64_t B, int64_t HW) {
  int64_t block = kPixBlock;
  while (block > kPixBlockMin && B * ((HW + block - 1) / block) < 16) block /= 2;
  return block;
}
constexpr int64_t kPixChunk = 64;   // pixels per task in channels_last cross-pixel passes

// NCHW passes that read per-pixel terms ([B, H*W] arrays) beside each channel row take four
// channel rows at a time where rows have at least this many pixels: the terms then no longer
// fit in L1 beside the rows (three of them: 3 * 2048 * 4 B = 24 KB), and each term loaded
// once for four rows saves three loads from L2. Shorter rows go one channel at a time: one
// sequential stream through x, which measured 1.5-2x faster than four interleaved short streams
// at 28x28 (spatial_stats_backward; AMD EPYC, AVX-512 and AVX2 copies).
constexpr int64_t kSharedTermsMinPixels = 2048;

// Software prefetch into L2 (prefetcht1), for the reductions that read x row by row. The
// hardware prefetcher restarts on every short row, and from DRAM such passes ran at a third
// to a half of what a copy reaches (AMD EPYC). On an Intel Xeon (family 6, model 167) the
// passes over one long stream gained as much: NCHW channel_stats and channels_last
// spatial_stats 1.2-2x, the NCHW backward reductions 1.0-1.6x (the AMD had measured no gain
// there). kPrefetchBytes is how far ahead they ask: about 32 KB, a few microseconds of
// reading, well inside L2 (16-64 KB measured alike).
constexpr int64_t kPrefetchBytes = 32 << 10;
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }
// The cache lines of one vector step (IO<T>::kStep elements) from p on, asked into L2.
template <typename T>
inline void prefetch_step_l2(const T* p) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));  // elements per cache line
  for (int64_t o = 0; o < IO<T>::kStep; o += kLine) prefetch_l2(p + o);
}
// Rows of row_bytes each in about kPrefetchBytes, at least one: how many rows ahead to ask.
inline int64_t rows_ahead(int64_t row_bytes) {
  return std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(1, row_bytes));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The dtypes every kernel takes; `A` is the accumulation type inside the body.
#define ATTNKERN_DISPATCH(x, fn, ...)                                                     \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (x).scalar_type(), fn, [&] { \
    using A = typename AccT<scalar_t>::type;                                              \
    __VA_ARGS__();                                                                        \
  })

// sigmoid(z) = 1 / (1 + exp(-z)) with ATen's exp_u20 (a degree-5 polynomial, within about 20
// ULP in float32, far inside the float32 tolerance; double keeps the 1-ULP exp): BAM's combine,
// a sigmoid per element, is bound by it. exp_u20 clamps its argument, which would turn a NaN
// logit into a number, so NaN logits pass through.
template <typename A>
inline Vectorized<A> sigmoid(const Vectorized<A>& z) {
  const Vectorized<A> one(1);
  const Vectorized<A> s = one / (one + z.neg().exp_u20());
  return Vectorized<A>::blendv(s, z, z.isnan());
}

// sigmoid of z[0..n), n < 2 * Vectorized<A>::size() (a row's tail), into s[0..n): the vector
// sigmoid on a zero-padded copy, so that every element gets the same function whatever its
// place in a row. (A scalar libm exp per tail element measured 2-3x slower than the vector
// body on rows with a tail: AMD EPYC with AVX-512, bam_combine_backward, NCHW 16x512x27x27.)
template <typename A>
inline void sigmoid_tail(const A* z, int64_t n, A* s) {
  constexpr int64_t L = Vectorized<A>::size();
  A zt[2 * L] = {}, st[2 * L];
  std::copy(z, z + n, zt);
  sigmoid(Vectorized<A>::loadu(zt)).store(st);
  sigmoid(Vectorized<A>::loadu(zt + L)).store(st + L);
  std::copy(st, st + n, s);
}

// Per-pixel gradient weights of the spatial statistics (spatial_stats_backward and
// gating_input_grad).
template <typename A>
struct SpatialWeights {
  Tensor mean;  // grad_smean / C
  Tensor max;   // grad_smax / scount (0 where nothing equals the max)
};

template <typename A>
SpatialWeights<A> spatial_weights(const Tensor& grad_smean, const Tensor& grad_smax,
                                  const Tensor& scount, int64_t C) {
  const int64_t n = grad_smean.numel();
  SpatialWeights<A> w{at::empty_like(grad_smean), at::empty_like(grad_smean)};
  const A* gm = grad_smean.data_ptr<A>();
  const A* gx = grad_smax.data_ptr<A>();
  const int32_t* cn = scount.data_ptr<int32_t>();
  A* wm = w.mean.template data_ptr<A>();
  A* wx = w.max.template data_ptr<A>();
  for (int64_t i = 0; i < n; ++i) {
    wm[i] = gm[i] / static_cast<A>(C);
    wx[i] = cn[i] > 0 ? gx[i] / static_cast<A>(cn[i]) : A(0);
  }
  return w;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace attnkern
