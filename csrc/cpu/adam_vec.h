#pragma once
// at::vec mirror of adam_element (mackay/adam.h): the same formula on Vectorized lanes, with
// pruned lanes (alpha = +inf) blended to 0 instead of branched around.
#include <ATen/cpu/vec/vec.h>

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

// kArd: alpha is meaningful (else the plain Adam path); kCurvature: h is updated.
template <bool kArd, bool kCurvature, typename T>
inline void adam_lanes(T* weight, const T* grad, T* exp_avg, T* exp_avg_sq, T* curvature,
                       const at::vec::Vectorized<T>& alpha, const at::vec::Vectorized<T>& grad_mul,
                       const VecAdamConstants<T>& c) {
  using V = at::vec::Vectorized<T>;
  const V zero(T(0));
  V w = V::loadu(weight);
  const V g = V::loadu(grad) * grad_mul;
  V m = V::loadu(exp_avg);
  V v = V::loadu(exp_avg_sq);
  V pruned = zero;
  V coefficient = c.weight_decay;
  if constexpr (kArd) {
    pruned = alpha == V(infinity<T>());
    coefficient = at::vec::fmadd(V::blendv(alpha, zero, pruned), c.inv_num_data, coefficient);
    if constexpr (kCurvature) {
      const V h = V::loadu(curvature);
      const V h_new = at::vec::fmadd(c.curvature_gain * g, g, c.curvature_decay * h);
      V::blendv(h_new, h, pruned).store(curvature);
    }
  }
  const V direction = at::vec::fmadd(coefficient, w, g);
  w = w * c.decay_factor;
  m = at::vec::fmadd(c.beta1, m, c.one_minus_beta1 * direction);
  v = at::vec::fmadd(c.beta2, v, c.one_minus_beta2 * direction * direction);
  const V denom = at::vec::fmadd(v.sqrt(), c.inv_bc2_sqrt, c.eps);
  w = w - c.step_size * m / denom;
  if constexpr (kArd) {
    w = V::blendv(w, zero, pruned);
    m = V::blendv(m, zero, pruned);
    v = V::blendv(v, zero, pruned);
  }
  w.store(weight);
  m.store(exp_avg);
  v.store(exp_avg_sq);
}

}  // namespace mackay
