// Applying the gates: gate_apply (out = x * gc * gs), gate_apply_residual (out = relu?(x * gc * gs +
// residual): the gate with a residual block's add and activation, for training) and
// gate_apply_residual_ (the same written into x, for inference),
// gate_apply_backward (the gates' gradients) and gating_input_grad (the input gradient of a CBAM or SE block, every term in
// one pass).
#include "both_axes.h"
#include "common.h"
#include "output_cache.h"

namespace attnkern {
namespace cpu {
inline namespace CPU_CAPABILITY {  // one copy per vector ISA (cpu_capability.h)
namespace {

// ---------------------------------------------------------------------------------------
// gate_apply: out = (x * gc) * gs; gate_apply_residual(_): out (or x) = relu?((x * gc) * gs + residual)
// ---------------------------------------------------------------------------------------

template <typename T, typename A, bool kResidual = false, bool kRelu = false>
inline void scale_row(const T* x, T* out, int64_t n, Operand<A> first, Operand<A> second,
                      const T* residual = nullptr) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V u, w;
    IO<T>::load(x + i, u, w);
    u = u * first.load(i);
    w = w * first.load(i + L);
    u = u * second.load(i);
    w = w * second.load(i + L);
    if constexpr (kResidual) {
      V ru, rw;
      IO<T>::load(residual + i, ru, rw);
      u = u + ru;
      w = w + rw;
    }
    if constexpr (kRelu) {
      u = at::vec::maximum(u, V(A(0)));  // NaN stays NaN, as torch.relu
      w = at::vec::maximum(w, V(A(0)));
    }
    IO<T>::store(out + i, u, w);
  }
  for (; i < n; ++i) {
    A y = static_cast<A>(x[i]) * first.at(i);
    y = y * second.at(i);
    if constexpr (kResidual) y = y + static_cast<A>(residual[i]);
    if constexpr (kRelu) y = y < A(0) ? A(0) : y;
    out[i] = static_cast<T>(y);
  }
}

template <typename T, typename A, bool kResidual = false, bool kRelu = false>
void gate_apply_nchw(const T* x, T* out, const A* gc, const A* gs, const Shape& s,
                     const T* residual = nullptr) {
  at::parallel_for(0, s.B * s.C, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / s.C;
      scale_row<T, A, kResidual, kRelu>(x + r * s.HW, out + r * s.HW, s.HW, fixed(gc ? gc[r] : A(1)),
                                        gs ? along(gs + b * s.HW) : fixed(A(1)),
                                        kResidual ? residual + r * s.HW : nullptr);
    }
  });
}

template <typename T, typename A, bool kResidual = false, bool kRelu = false>
void gate_apply_channels_last(const T* x, T* out, const A* gc, const A* gs, const Shape& s,
                              const T* residual = nullptr) {
  at::parallel_for(0, s.B * s.HW, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / s.HW;
      scale_row<T, A, kResidual, kRelu>(x + r * s.C, out + r * s.C, s.C,
                                        gc ? along(gc + b * s.C) : fixed(A(1)), fixed(gs ? gs[r] : A(1)),
                                        kResidual ? residual + r * s.C : nullptr);
    }
  });
}

// out <- relu?(x * gc * gs + residual) (out may be x): one read of x and residual, one write.
template <typename T, typename A, bool kRelu>
void gate_apply_residual_into(const T* x, T* out, const T* residual, const A* gc, const A* gs, const Shape& s) {
  if (s.channels_last) {
    gate_apply_channels_last<T, A, true, kRelu>(x, out, gc, gs, s, residual);
  } else {
    gate_apply_nchw<T, A, true, kRelu>(x, out, gc, gs, s, residual);
  }
}

template <typename T, typename A>
void gate_apply_residual_into(const T* x, T* out, const T* residual, const A* gc, const A* gs, const Shape& s,
                              bool relu) {
  if (relu) {
    gate_apply_residual_into<T, A, true>(x, out, residual, gc, gs, s);
  } else {
    gate_apply_residual_into<T, A, false>(x, out, residual, gc, gs, s);
  }
}

// q = grad_out * x
template <typename A>
struct ProductQ {
  using V = Vectorized<A>;
  static constexpr bool kElementsOnly = true;
  inline V vec(const V& d, const V& x, int64_t, int64_t, int64_t, bool) const { return d * x; }
};

// ---------------------------------------------------------------------------------------
// gating_input_grad:
//   dx = (grad_out * gc) * gs                                    (the gate_apply term)
//      + gc * (w_smean + w_smax * [x * gc == smax])              (spatial_stats of x * gc)
//      + u_cmean + u_cmax * [x == cmax]                          (channel_stats of x)
// with w_smean = grad_smean / C, w_smax = grad_smax / scount, u_cmean = grad_cmean / HW,
// u_cmax = grad_cmax / ccount; absent terms are neutral (gates 1, weights 0).
// ---------------------------------------------------------------------------------------

// The operands of one row (a channel in NCHW, a pixel in channels_last).
template <typename A>
struct InputGradRow {
  Operand<A> gc, gs;                   // gates
  Operand<A> w_smean, w_smax, smax;    // spatial-statistics terms
  Operand<A> u_cmean, u_cmax, cmax;    // channel-statistics terms
};

// Which terms are present: compile-time flags, so SE's dx (grad_out * gc + grad_cmean / HW)
// does none of CBAM's max-mask work.
struct InputGradTerms {
  bool grad_out, spatial, channel_max;
};

// dx for one vector of elements from x, grad_out (d) and the terms at those elements.
template <bool kGradOut, bool kSpatial, bool kChannelMax, typename V>
inline V input_grad_vec(const V& x, const V& d, const V& gc, const V& gs, const V& w_smean, const V& w_smax,
                        const V& smax, const V& u_cmean, const V& u_cmax, const V& cmax) {
  V r = u_cmean;
  if constexpr (kGradOut) r = r + (d * gc) * gs;
  if constexpr (kSpatial) r = r + gc * (w_smean + ((x * gc == smax) & w_smax));
  if constexpr (kChannelMax) r = r + ((x == cmax) & u_cmax);
  return r;
}

template <typename T, typename A, bool kGradOut, bool kSpatial, bool kChannelMax>
inline void input_grad_row(const T* x, const T* grad_out, T* dx, int64_t n, const InputGradRow<A>& t) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V xa, xb, da, db;
    if constexpr (kSpatial || kChannelMax) IO<T>::load(x + i, xa, xb);
    if constexpr (kGradOut) IO<T>::load(grad_out + i, da, db);
    V out[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t j = i + h * L;
      out[h] = input_grad_vec<kGradOut, kSpatial, kChannelMax>(
          h ? xb : xa, h ? db : da, t.gc.load(j), t.gs.load(j), t.w_smean.load(j), t.w_smax.load(j),
          t.smax.load(j), t.u_cmean.load(j), t.u_cmax.load(j), t.cmax.load(j));
    }
    IO<T>::store(dx + i, out[0], out[1]);
  }
  for (; i < n; ++i) {
    const A xv = static_cast<A>(x[i]);
    const A g = t.gc.at(i);
    A r = t.u_cmean.at(i);
    if constexpr (kGradOut) r = r + (static_cast<A>(grad_out[i]) * g) * t.gs.at(i);
    if constexpr (kSpatial) {
      const A y = xv * g;
      r = r + g * (t.w_smean.at(i) + (y == t.smax.at(i) ? t.w_smax.at(i) : A(0)));
    }
    if constexpr (kChannelMax) r = r + (xv == t.cmax.at(i) ? t.u_cmax.at(i) : A(0));
    dx[i] = static_cast<T>(r);
  }
}

// The per-(b, c) and per-(b, hw) arrays of the terms, dense and in the accumulation dtype.
template <typename A>
struct InputGradArrays {
  const A* gc;       // [B, C], 1 when absent
  const A* gs;       // [B, HW], 1 when absent
  const A* w_smean;  // [B, HW] or null
  const A* w_smax;   // [B, HW] or null
  const A* smax;     // [B, HW] or null
  const A* u_cmean;  // [B, C]
  const A* u_cmax;   // [B, C]
  const A* cmax;     // [B, C] or null
};

template <typename A>
inline Operand<A> at_or_zero(const A* p, int64_t i) {
  return fixed(p ? p[i] : A(0));
}
template <typename A>
inline Operand<A> row_or_zero(const A* p, int64_t offset) {
  return p ? along(p + offset) : fixed(A(0));
}

// NCHW, K channel rows r..r+K-1 of one image at a time (n pixels each): the per-pixel terms
// (gs, and w_smean, w_smax, smax when kSpatial) are loaded once for the K rows, the channels'
// scalars broadcast per row. Each element gets input_grad_vec as one row at a time gives it.
template <int K, typename T, typename A, bool kGradOut, bool kSpatial, bool kChannelMax>
inline void input_grad_rows_nchw(const T* x, const T* grad_out, T* dx, int64_t n, int64_t r, int64_t p,
                                 const InputGradArrays<A>& a) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr int64_t S = IO<T>::kStep;
  const V zero(0);
  int64_t i = 0;
  for (; i + S <= n; i += S) {
    V gs[2], wm[2] = {zero, zero}, wx[2] = {zero, zero}, sm[2] = {zero, zero};
    for (int h = 0; h < 2; ++h) {
      const int64_t j = p + i + h * L;
      gs[h] = V::loadu(a.gs + j);
      if constexpr (kSpatial) {
        wm[h] = V::loadu(a.w_smean + j);
        wx[h] = V::loadu(a.w_smax + j);
        sm[h] = V::loadu(a.smax + j);
      }
    }
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const int64_t o = k * n + i, rk = r + k;
      V xv[2], dv[2];
      if constexpr (kSpatial || kChannelMax) IO<T>::load(x + o, xv[0], xv[1]);
      if constexpr (kGradOut) IO<T>::load(grad_out + o, dv[0], dv[1]);
      const V gc(a.gc[rk]), ucm(a.u_cmean[rk]), ucx(a.u_cmax[rk]), cm(kChannelMax ? a.cmax[rk] : A(0));
      V out[2];
      for (int h = 0; h < 2; ++h)
        out[h] = input_grad_vec<kGradOut, kSpatial, kChannelMax>(xv[h], dv[h], gc, gs[h], wm[h], wx[h], sm[h],
                                                                  ucm, ucx, cm);
      IO<T>::store(dx + o, out[0], out[1]);
    }
  }
  if (i < n) {  // the rows' tails, a row at a time
    for (int k = 0; k < K; ++k) {
      const int64_t o = k * n + i, rk = r + k;
      const InputGradRow<A> t{fixed(a.gc[rk]), along(a.gs + p + i), row_or_zero(a.w_smean, p + i),
                              row_or_zero(a.w_smax, p + i), row_or_zero(a.smax, p + i), fixed(a.u_cmean[rk]),
                              fixed(a.u_cmax[rk]), at_or_zero(a.cmax, rk)};
      input_grad_row<T, A, kGradOut, kSpatial, kChannelMax>(x + o, grad_out ? grad_out + o : nullptr, dx + o,
                                                            n - i, t);
    }
  }
}

// NCHW: four channel rows at a time where rows are long (kSharedTermsMinPixels), sharing the
// per-pixel terms' loads: those are four arrays of H*W floats with the spatial terms, 49 KB at
// 56x56, read from L2 once per row otherwise. Shorter rows, one at a time.
template <typename T, typename A, bool kGradOut, bool kSpatial, bool kChannelMax>
void input_grad_nchw(const T* x, const T* grad_out, T* dx, const InputGradArrays<A>& a, const Shape& s) {
  constexpr int K = 4;
  const int64_t C = s.C, HW = s.HW;
  const int64_t k = HW >= kSharedTermsMinPixels ? K : 1, groups = ceil_div(C, k);
  at::parallel_for(0, s.B * groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / groups, c0 = (t % groups) * k, c1 = std::min(C, c0 + k), p = b * HW;
      const int64_t r0 = b * C + c0, o0 = r0 * HW;
      if (c1 - c0 == K) {
        input_grad_rows_nchw<K, T, A, kGradOut, kSpatial, kChannelMax>(
            x + o0, grad_out ? grad_out + o0 : nullptr, dx + o0, HW, r0, p, a);
      } else {
        for (int64_t r = r0; r < b * C + c1; ++r) {
          const int64_t o = r * HW;
          input_grad_rows_nchw<1, T, A, kGradOut, kSpatial, kChannelMax>(
              x + o, grad_out ? grad_out + o : nullptr, dx + o, HW, r, p, a);
        }
      }
    }
  });
}

template <typename T, typename A, bool kGradOut, bool kSpatial, bool kChannelMax>
void input_grad_channels_last(const T* x, const T* grad_out, T* dx, const InputGradArrays<A>& a,
                              const Shape& s) {
  at::parallel_for(0, s.B * s.HW, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * s.C, cb = (r / s.HW) * s.C;
      const InputGradRow<A> t{along(a.gc + cb),         fixed(a.gs[r]),        at_or_zero(a.w_smean, r),
                              at_or_zero(a.w_smax, r),  at_or_zero(a.smax, r), along(a.u_cmean + cb),
                              along(a.u_cmax + cb),     row_or_zero(a.cmax, cb)};
      input_grad_row<T, A, kGradOut, kSpatial, kChannelMax>(x + o, grad_out ? grad_out + o : nullptr,
                                                            dx + o, s.C, t);
    }
  });
}

// Calls f(std::bool_constant<b>...) for the runtime flags: one instantiation per combination.
template <typename F>
void with_flags(F&& f) {
  f();
}
template <typename F, typename... Rest>
void with_flags(F&& f, bool first, Rest... rest) {
  if (first) {
    with_flags([&](auto... fl) { f(std::true_type{}, fl...); }, rest...);
  } else {
    with_flags([&](auto... fl) { f(std::false_type{}, fl...); }, rest...);
  }
}

template <typename T, typename A>
void input_grad(const T* x, const T* grad_out, T* dx, const InputGradArrays<A>& a, const Shape& s,
                InputGradTerms terms) {
  with_flags(
      [&](auto has_grad_out, auto spatial, auto channel_max) {
        constexpr bool G = decltype(has_grad_out)::value, P = decltype(spatial)::value,
                       M = decltype(channel_max)::value;
        if (s.channels_last) {
          input_grad_channels_last<T, A, G, P, M>(x, grad_out, dx, a, s);
        } else {
          input_grad_nchw<T, A, G, P, M>(x, grad_out, dx, a, s);
        }
      },
      terms.grad_out, terms.spatial, terms.channel_max);
}

}  // namespace

// The checked entries.

Tensor gate_apply(const Tensor& x, const OptTensor& gc, const OptTensor& gs) {
  static constexpr const char* fn = "attnkern::gate_apply";
  const Shape s = check_x(x, fn);
  if (given(gc)) check_small(*gc, "gc", s.B, s.C, s.acc, fn);
  if (given(gs)) check_small(*gs, "gs", s.B, s.HW, s.acc, fn);
  Tensor out = empty_output_like(x);
  ATTNKERN_DISPATCH(x, fn, [&] {
    const A* gcp = given(gc) ? gc->data_ptr<A>() : nullptr;
    const A* gsp = given(gs) ? gs->data_ptr<A>() : nullptr;
    if (s.channels_last) {
      gate_apply_channels_last<scalar_t, A>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gcp, gsp, s);
    } else {
      gate_apply_nchw<scalar_t, A>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gcp, gsp, s);
    }
  });
  return out;
}

namespace {
// gate_apply_residual(_)'s checks and kernel: out <- relu?(x * gc * gs + residual); out may be x.
void gate_apply_residual_checked(const Tensor& x, const Tensor& out, const OptTensor& gc, const OptTensor& gs,
                                 const Tensor& residual, bool relu, const Shape& s, const char* fn) {
  if (given(gc)) check_small(*gc, "gc", s.B, s.C, s.acc, fn);
  if (given(gs)) check_small(*gs, "gs", s.B, s.HW, s.acc, fn);
  TORCH_CHECK(residual.defined(), fn, ": residual is undefined");
  check_big(residual, "residual", x, s, fn);
  // check_x took x's dtype already: the dispatch's own message (its name) is never seen
  ATTNKERN_DISPATCH(x, "attnkern::gate_apply_residual", [&] {
    gate_apply_residual_into<scalar_t, A>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                          residual.data_ptr<scalar_t>(), given(gc) ? gc->data_ptr<A>() : nullptr,
                                          given(gs) ? gs->data_ptr<A>() : nullptr, s, relu);
  });
}
}  // namespace

Tensor gate_apply_residual(const Tensor& x, const OptTensor& gc, const OptTensor& gs,
                           const Tensor& residual, bool relu) {
  static constexpr const char* fn = "attnkern::gate_apply_residual";
  const Shape s = check_x(x, fn);
  Tensor out = empty_output_like(x);
  gate_apply_residual_checked(x, out, gc, gs, residual, relu, s, fn);
  return out;
}

Tensor& gate_apply_residual_(Tensor& x, const OptTensor& gc, const OptTensor& gs,
                             const Tensor& residual, bool relu) {
  static constexpr const char* fn = "attnkern::gate_apply_residual_";
  const Shape s = check_x(x, fn);
  TORCH_CHECK(!residual.defined() || !residual.is_same(x), fn, ": residual must not be x itself");
  gate_apply_residual_checked(x, x, gc, gs, residual, relu, s, fn);
  return x;
}

std::tuple<Tensor, Tensor> gate_apply_backward(const Tensor& grad_out, const Tensor& x,
                                               const OptTensor& gc, const OptTensor& gs,
                                               bool need_grad_gc, bool need_grad_gs) {
  static constexpr const char* fn = "attnkern::gate_apply_backward";
  const Shape s = check_x(x, fn);
  check_big(grad_out, "grad_out", x, s, fn);
  Tensor gc1 = given_or(gc, "gc", s.B, s.C, s.acc, 1.0, fn);
  Tensor gs1 = given_or(gs, "gs", s.B, s.HW, s.acc, 1.0, fn);
  if (!need_grad_gc && !need_grad_gs) return {no_grad_of(x, s.acc), no_grad_of(x, s.acc)};
  auto opts = x.options().dtype(s.acc);
  Tensor grad_gc = at::empty({s.B, s.C}, opts), grad_gs = at::empty({s.B, s.HW}, opts);
  ATTNKERN_DISPATCH(x, fn, [&] {
    const BothAxes<A> r{gs1.data_ptr<A>(), gc1.data_ptr<A>(), grad_gc.data_ptr<A>(), grad_gs.data_ptr<A>()};
    reduce_both_axes<scalar_t>(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), s, r, ProductQ<A>{});
  });
  return {need_grad_gc ? grad_gc : no_grad_of(x, s.acc), need_grad_gs ? grad_gs : no_grad_of(x, s.acc)};
}

Tensor gating_input_grad(const Tensor& x, const OptTensor& grad_out, const OptTensor& gc,
                         const OptTensor& gs, const OptTensor& smax, const OptTensor& scount,
                         const OptTensor& grad_smean, const OptTensor& grad_smax,
                         const OptTensor& cmax, const OptTensor& ccount,
                         const OptTensor& grad_cmean, const OptTensor& grad_cmax) {
  static constexpr const char* fn = "attnkern::gating_input_grad";
  const Shape s = check_x(x, fn);
  if (given(grad_out)) check_big(*grad_out, "grad_out", x, s, fn);
  const bool spatial = given(grad_smean) || given(grad_smax);
  TORCH_CHECK(!given(grad_smax) || (given(smax) && given(scount)), fn,
              ": grad_smax needs smax and scount");
  TORCH_CHECK(!given(grad_cmax) || (given(cmax) && given(ccount)), fn,
              ": grad_cmax needs cmax and ccount");
  Tensor dx = empty_output_like(x);
  ATTNKERN_DISPATCH(x, fn, [&] {
    const int64_t B = s.B, C = s.C, HW = s.HW;
    Tensor gc_dense = given_or(gc, "gc", B, C, s.acc, 1.0, fn);
    Tensor gs_dense = given_or(gs, "gs", B, HW, s.acc, 1.0, fn);
    // spatial-statistics terms
    SpatialWeights<A> w;
    Tensor smax_dense;
    if (spatial) {
      Tensor grad_smean_dense = given_or(grad_smean, "grad_smean", B, HW, s.acc, 0.0, fn);
      Tensor grad_smax_dense = given_or(grad_smax, "grad_smax", B, HW, s.acc, 0.0, fn);
      Tensor scount_dense = given(scount) ? *scount : at::ones({B, HW}, x.options().dtype(at::kInt));
      check_small(scount_dense, "scount", B, HW, at::kInt, fn);
      smax_dense = given_or(smax, "smax", B, HW, s.acc, 0.0, fn);
      w = spatial_weights<A>(grad_smean_dense, grad_smax_dense, scount_dense, C);
    }
    // channel-statistics terms: u_cmean = grad_cmean / HW, u_cmax = grad_cmax / ccount
    Tensor u_cmean = at::zeros({B, C}, x.options().dtype(s.acc));
    Tensor u_cmax = at::zeros({B, C}, x.options().dtype(s.acc));
    Tensor cmax_used;
    A* u_cmean_p = u_cmean.data_ptr<A>();
    A* u_cmax_p = u_cmax.data_ptr<A>();
    if (given(grad_cmean)) {
      check_small(*grad_cmean, "grad_cmean", B, C, s.acc, fn);
      const A* g = grad_cmean->data_ptr<A>();
      for (int64_t i = 0; i < B * C; ++i) u_cmean_p[i] = g[i] / static_cast<A>(HW);
    }
    if (given(grad_cmax)) {
      check_small(*grad_cmax, "grad_cmax", B, C, s.acc, fn);
      check_small(*ccount, "ccount", B, C, at::kInt, fn);
      check_small(*cmax, "cmax", B, C, s.acc, fn);
      const A* g = grad_cmax->data_ptr<A>();
      const int32_t* n = ccount->data_ptr<int32_t>();
      for (int64_t i = 0; i < B * C; ++i) u_cmax_p[i] = n[i] > 0 ? g[i] / static_cast<A>(n[i]) : A(0);
      cmax_used = *cmax;
    }
    const InputGradArrays<A> arrays{gc_dense.data_ptr<A>(), gs_dense.data_ptr<A>(),
                                    data_or_null<A>(w.mean), data_or_null<A>(w.max),
                                    data_or_null<A>(smax_dense), u_cmean_p,
                                    u_cmax_p, data_or_null<A>(cmax_used)};
    const scalar_t* grad_out_p = given(grad_out) ? grad_out->data_ptr<scalar_t>() : nullptr;
    input_grad<scalar_t, A>(x.data_ptr<scalar_t>(), grad_out_p, dx.data_ptr<scalar_t>(), arrays, s,
                            InputGradTerms{grad_out_p != nullptr, spatial, cmax_used.defined()});
  });
  return dx;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace attnkern

// The schemas, the tables of the copies and the dispatcher's CPU kernels: once, in the
// baseline build.
#ifdef CPU_CAPABILITY_DEFAULT
ATTNKERN_CPU_KERNEL(gate_apply)
ATTNKERN_CPU_KERNEL(gate_apply_residual)
ATTNKERN_CPU_KERNEL(gate_apply_residual_)
ATTNKERN_CPU_KERNEL(gate_apply_backward)
ATTNKERN_CPU_KERNEL(gating_input_grad)
TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def("gate_apply(Tensor x, Tensor? gc, Tensor? gs) -> Tensor");
  m.def("gate_apply_residual(Tensor x, Tensor? gc, Tensor? gs, Tensor residual, bool relu) -> Tensor");
  m.def("gate_apply_residual_(Tensor(a!) x, Tensor? gc, Tensor? gs, Tensor residual, bool relu) -> Tensor(a!)");
  m.def("gate_apply_backward(Tensor grad_out, Tensor x, Tensor? gc, Tensor? gs, bool need_grad_gc, "
      "bool need_grad_gs) -> (Tensor, Tensor)");
  m.def("gating_input_grad(Tensor x, Tensor? grad_out, Tensor? gc, Tensor? gs, Tensor? smax, "
      "Tensor? scount, Tensor? grad_smean, Tensor? grad_smax, Tensor? cmax, Tensor? ccount, "
      "Tensor? grad_cmean, Tensor? grad_cmax) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnkern, CPU, m) {
  m.impl("gate_apply", ATTNKERN_ACTIVE_CPU_KERNEL(gate_apply));
  m.impl("gate_apply_residual", ATTNKERN_ACTIVE_CPU_KERNEL(gate_apply_residual));
  m.impl("gate_apply_residual_", ATTNKERN_ACTIVE_CPU_KERNEL(gate_apply_residual_));
  m.impl("gate_apply_backward", ATTNKERN_ACTIVE_CPU_KERNEL(gate_apply_backward));
  m.impl("gating_input_grad", ATTNKERN_ACTIVE_CPU_KERNEL(gating_input_grad));
}
#endif  // CPU_CAPABILITY_DEFAULT
