#pragma once
// at::vec mirror of adam_element (mackay/adam.h): the same formula on Vectorized lanes, with
// pruned lanes (alpha = +inf) blended to 0 instead of branched around.
#include <ATen/cpu/vec/vec.h>

#include <tuple>
#include <type_traits>

#include "mackay/adam.h"

namespace mackay {

template <typename T>
struct VecAdamConstants {
  using V = at::vec::Vectorized<T>;
  V beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, inv_bc2_sqrt, weight_decay,
      decay_factor, inv_num_data, curvature_decay, curvature_gain;
  explicit VecAdamConstants(const AdamConstants<T>& c)
      : beta1(c.beta1), beta2(c.beta2), one_minus_beta1(c.one_minus_beta1),
        one_minus_beta2(c.one_minus_beta2), eps(c.eps), step_size(c.step_size),
        inv_bc2_sqrt(c.inv_bc2_sqrt), weight_decay(c.weight_decay), decay_factor(c.decay_factor),
        inv_num_data(c.inv_num_data), curvature_decay(c.curvature_decay),
        curvature_gain(c.curvature_gain) {}
};

// flush_subnormal (mackay/adam.h) on lanes.
template <typename T>
inline at::vec::Vectorized<T> flush_subnormal_lanes(const at::vec::Vectorized<T>& value) {
  using V = at::vec::Vectorized<T>;
  return V::blendv(value, V(T(0)), value.abs() < V(smallest_normal<T>()));
}

// One step on lanes held in registers (g already scaled): w, m, v (and h) updated in place.
// kArd: alpha is meaningful (else the plain Adam path); kCurvature: h is updated.
template <bool kArd, bool kCurvature, typename T>
inline void adam_values(at::vec::Vectorized<T>& w, const at::vec::Vectorized<T>& g, at::vec::Vectorized<T>& m,
                        at::vec::Vectorized<T>& v, at::vec::Vectorized<T>& h,
                        const at::vec::Vectorized<T>& alpha, const VecAdamConstants<T>& c) {
  using V = at::vec::Vectorized<T>;
  const V zero(T(0));
  V pruned = zero;
  V coefficient = c.weight_decay;
  if constexpr (kArd) {
    pruned = alpha == V(infinity<T>());
    coefficient = at::vec::fmadd(V::blendv(alpha, zero, pruned), c.inv_num_data, coefficient);
    if constexpr (kCurvature) {
      const V h_new = flush_subnormal_lanes(at::vec::fmadd(c.curvature_gain * g, g, c.curvature_decay * h));
      h = V::blendv(h_new, h, pruned);
    }
  }
  const V direction = at::vec::fmadd(coefficient, w, g);
  w = w * c.decay_factor;
  m = flush_subnormal_lanes(at::vec::fmadd(c.beta1, m, c.one_minus_beta1 * direction));
  v = flush_subnormal_lanes(at::vec::fmadd(c.beta2, v, c.one_minus_beta2 * direction * direction));
  const V denom = at::vec::fmadd(v.sqrt(), c.inv_bc2_sqrt, c.eps);
  w = w - c.step_size * m / denom;
  if constexpr (kArd) {
    w = V::blendv(w, zero, pruned);
    m = V::blendv(m, zero, pruned);
    v = V::blendv(v, zero, pruned);
  }
}

// adam_values on one vector of float32/float64 lanes in memory.
template <bool kArd, bool kCurvature, typename T>
inline void adam_lanes(T* weight, const T* grad, T* exp_avg, T* exp_avg_sq, T* curvature,
                       const at::vec::Vectorized<T>& alpha, const at::vec::Vectorized<T>& grad_mul,
                       const VecAdamConstants<T>& c) {
  using V = at::vec::Vectorized<T>;
  V w = V::loadu(weight), m = V::loadu(exp_avg), v = V::loadu(exp_avg_sq);
  V h = kCurvature ? V::loadu(curvature) : V(T(0));
  adam_values<kArd, kCurvature>(w, V::loadu(grad) * grad_mul, m, v, h, alpha, c);
  w.store(weight);
  m.store(exp_avg);
  v.store(exp_avg_sq);
  if constexpr (kCurvature) h.store(curvature);
}

// adam_values on one vector of bfloat16/float16 lanes in memory: the arithmetic in float, on the
// two float vectors each half-precision vector widens to (the scalar loop took 3.6-4.2x
// torch.optim.Adam's time on these dtypes, 0.56x on float32).
template <bool kArd, bool kCurvature, typename R, typename H, typename AlphaAt>
inline void adam_reduced_lanes(R* weight, const R* grad, R* exp_avg, R* exp_avg_sq, H* curvature,
                               const AlphaAt& alpha_at, int64_t j, const at::vec::Vectorized<float>& grad_mul,
                               const VecAdamConstants<float>& c) {
  using VR = at::vec::Vectorized<R>;
  using VF = at::vec::Vectorized<float>;
  auto [w0, w1] = at::vec::convert_to_float<R>(VR::loadu(weight));
  auto [g0, g1] = at::vec::convert_to_float<R>(VR::loadu(grad));
  auto [m0, m1] = at::vec::convert_to_float<R>(VR::loadu(exp_avg));
  auto [v0, v1] = at::vec::convert_to_float<R>(VR::loadu(exp_avg_sq));
  VF h0(0.0f), h1(0.0f);
  if constexpr (kCurvature && std::is_same_v<H, float>) {   // h kept in float32
    h0 = VF::loadu(curvature);
    h1 = VF::loadu(curvature + VF::size());
  } else if constexpr (kCurvature) {
    std::tie(h0, h1) = at::vec::convert_to_float<R>(VR::loadu(curvature));
  }
  VF a0(0.0f), a1(0.0f);
  if constexpr (kArd) {
    a0 = alpha_at.lanes(j);
    a1 = alpha_at.lanes(j + VF::size());
  }
  adam_values<kArd, kCurvature>(w0, g0 * grad_mul, m0, v0, h0, a0, c);
  adam_values<kArd, kCurvature>(w1, g1 * grad_mul, m1, v1, h1, a1, c);
  at::vec::convert_from_float<R>(w0, w1).store(weight);
  at::vec::convert_from_float<R>(m0, m1).store(exp_avg);
  at::vec::convert_from_float<R>(v0, v1).store(exp_avg_sq);
  if constexpr (kCurvature && std::is_same_v<H, float>) {
    h0.store(curvature);
    h1.store(curvature + VF::size());
  } else if constexpr (kCurvature) {
    at::vec::convert_from_float<R>(h0, h1).store(curvature);
  }
}

}  // namespace mackay
