// CPU kernel of mackay_ext::mackay_adam_step_: the elements of all tensors of the call form one
// index space, split evenly between the threads of one parallel region (each thread walks the
// tensor pieces of its share); every dtype uses at::vec lanes (bfloat16/float16 widened to float),
// and a tensor's tail the shared scalar formula.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "adam_vec.h"
#include "mackay/adam_driver.h"

namespace mackay {
namespace {

// Threads' shares start and end on multiples of kUnit elements within a tensor: whole cache
// lines of float32, whole at::vec lanes, so only a tensor's own tail runs the scalar loop.
constexpr int64_t kUnit = 64;
// Fewest units worth a thread of its own (about 32K elements: below that the wake-up costs more
// than the work).
constexpr int64_t kGrainUnits = 512;

template <typename scalar_t>
using opmath_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// curv_t: the curvature's type, scalar_t or float (h of a bfloat16 / float16 weight kept in
// float32, whose 1% steps would vanish in half precision)
template <typename scalar_t, typename curv_t = scalar_t>
struct Pointers {
  scalar_t *weight, *exp_avg, *exp_avg_sq;
  curv_t* curvature;
  const scalar_t* grad;
  const float* alpha;
};

// Elements [begin, end) of one tensor whose alpha is alpha_at(j) for j in [0, end - begin).
template <bool kArd, bool kCurvature, typename scalar_t, typename curv_t, typename AlphaAt>
void run_segment(const Pointers<scalar_t, curv_t>& p, int64_t begin, int64_t end, AlphaAt alpha_at,
                 opmath_of<scalar_t> grad_mul, const AdamConstants<opmath_of<scalar_t>>& c) {
  using opmath_t = opmath_of<scalar_t>;
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {   // (curv_t is scalar_t here)
    using V = at::vec::Vectorized<scalar_t>;
    constexpr int64_t kLanes = V::size();
    const VecAdamConstants<scalar_t> vc(c);
    const V vgrad_mul(grad_mul);
    for (; i + kLanes <= end; i += kLanes) {
      V alpha(scalar_t(0));
      if constexpr (kArd) alpha = alpha_at.lanes(i - begin);
      adam_lanes<kArd, kCurvature>(p.weight + i, p.grad + i, p.exp_avg + i, p.exp_avg_sq + i,
                                   kCurvature ? p.curvature + i : nullptr, alpha, vgrad_mul, vc);
    }
  } else {   // bfloat16 / float16: widened to float lanes
    constexpr int64_t kLanes = at::vec::Vectorized<scalar_t>::size();
    const VecAdamConstants<float> vc(c);
    const at::vec::Vectorized<float> vgrad_mul(grad_mul);
    for (; i + kLanes <= end; i += kLanes) {
      adam_reduced_lanes<kArd, kCurvature>(p.weight + i, p.grad + i, p.exp_avg + i, p.exp_avg_sq + i,
                                           kCurvature ? p.curvature + i : nullptr, alpha_at, i - begin,
                                           vgrad_mul, vc);
    }
  }
  for (; i < end; ++i) {
    opmath_t w = p.weight[i], m = p.exp_avg[i], v = p.exp_avg_sq[i];
    opmath_t h = kCurvature ? static_cast<opmath_t>(p.curvature[i]) : opmath_t(0);
    const opmath_t alpha = kArd ? alpha_at.one(i - begin) : opmath_t(0);
    adam_element<opmath_t>(w, static_cast<opmath_t>(p.grad[i]) * grad_mul, m, v,
                           kCurvature ? &h : nullptr, alpha, c);
    p.weight[i] = static_cast<scalar_t>(w);
    p.exp_avg[i] = static_cast<scalar_t>(m);
    p.exp_avg_sq[i] = static_cast<scalar_t>(v);
    if (kCurvature) p.curvature[i] = static_cast<curv_t>(h);
  }
}

// alpha read element by element from a contiguous run of alpha.
template <typename T>
struct AlphaRun {
  const float* base;
  at::vec::Vectorized<T> lanes(int64_t j) const {
    if constexpr (std::is_same_v<T, float>) {
      return at::vec::Vectorized<float>::loadu(base + j);
    } else {
      T values[at::vec::Vectorized<T>::size()];
      for (int64_t k = 0; k < at::vec::Vectorized<T>::size(); ++k) values[k] = base[j + k];
      return at::vec::Vectorized<T>::loadu(values);
    }
  }
  T one(int64_t j) const { return static_cast<T>(base[j]); }
};

// one alpha for the whole segment (a row or a filter).
template <typename T>
struct AlphaConst {
  T value;
  at::vec::Vectorized<T> lanes(int64_t) const { return at::vec::Vectorized<T>(value); }
  T one(int64_t) const { return value; }
};

template <bool kCurvature, typename scalar_t, typename curv_t>
void run_ard_chunk(const AdamTensor& t, const Pointers<scalar_t, curv_t>& p, int64_t begin, int64_t end,
                   opmath_of<scalar_t> grad_mul, const AdamConstants<opmath_of<scalar_t>>& c) {
  using opmath_t = opmath_of<scalar_t>;
  const int64_t inner = t.alpha_inner, size = t.alpha_size;
  int64_t i = begin;
  while (i < end) {
    if (inner == 1) {  // alpha changes every element: contiguous runs until alpha wraps
      const int64_t k = size == t.param.numel() ? i : i % size;
      const int64_t stop = std::min(end, i + (size - k));
      run_segment<true, kCurvature>(p, i, stop, AlphaRun<opmath_t>{p.alpha + k}, grad_mul, c);
      i = stop;
    } else {  // alpha constant over runs of `inner` elements
      const int64_t stop = std::min(end, (i / inner + 1) * inner);
      const opmath_t alpha = p.alpha[(i / inner) % size];
      run_segment<true, kCurvature>(p, i, stop, AlphaConst<opmath_t>{alpha}, grad_mul, c);
      i = stop;
    }
  }
}

template <typename scalar_t, typename curv_t>
void run_chunk_as(const AdamTensor& t, int64_t begin, int64_t end, const AdamHyper& hyper,
                  opmath_of<scalar_t> grad_mul) {
  using opmath_t = opmath_of<scalar_t>;
  const AdamConstants<opmath_t> c(hyper, static_cast<double>(*t.step.const_data_ptr<float>()));  // already incremented
  const Pointers<scalar_t, curv_t> p{
      t.param.mutable_data_ptr<scalar_t>(), t.exp_avg.mutable_data_ptr<scalar_t>(),
      t.exp_avg_sq.mutable_data_ptr<scalar_t>(),
      t.curvature.defined() ? t.curvature.mutable_data_ptr<curv_t>() : nullptr,
      t.grad.const_data_ptr<scalar_t>(),
      t.alpha.defined() ? t.alpha.const_data_ptr<float>() : nullptr};
  if (!t.alpha.defined()) {
    run_segment<false, false>(p, begin, end, AlphaConst<opmath_t>{0}, grad_mul, c);
  } else if (t.curvature.defined()) {
    run_ard_chunk<true>(t, p, begin, end, grad_mul, c);
  } else {
    run_ard_chunk<false>(t, p, begin, end, grad_mul, c);
  }
}

template <typename scalar_t>
void run_chunk(const AdamTensor& t, int64_t begin, int64_t end, const AdamHyper& hyper,
               opmath_of<scalar_t> grad_mul) {
  if constexpr (!std::is_same_v<scalar_t, opmath_of<scalar_t>>) {   // bfloat16 / float16
    if (t.curvature.defined() && t.curvature.scalar_type() == at::kFloat) {
      run_chunk_as<scalar_t, float>(t, begin, end, hyper, grad_mul);
      return;
    }
  }
  run_chunk_as<scalar_t, scalar_t>(t, begin, end, hyper, grad_mul);
}

void mackay_adam_kernel_cpu(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf) {
  // On the CPU reading these is free (no device to synchronise with).
  if (found_inf && *found_inf->const_data_ptr<float>() != 0.0f) return;
  const double grad_mul = grad_scale ? 1.0 / *grad_scale->const_data_ptr<float>() : 1.0;
  for (const AdamTensor& t : tensors) *t.step.mutable_data_ptr<float>() += 1.0f;
  // A tensor of numel elements holds units [first_unit[k], first_unit[k + 1]); at::parallel_for
  // hands each thread one contiguous range of units, so the threads get equal shares of the
  // elements whatever the tensors' sizes (giving out whole tensors or fixed-size chunks in
  // order left LeNet-300-100's 235K-element layer mostly to one thread of two).
  std::vector<int64_t> first_unit(tensors.size() + 1, 0);
  for (size_t k = 0; k < tensors.size(); ++k) {
    first_unit[k + 1] = first_unit[k] + (tensors[k].param.numel() + kUnit - 1) / kUnit;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, tensors.front().param.scalar_type(), "mackay_adam_step_cpu", [&] {
        at::parallel_for(0, first_unit.back(), kGrainUnits, [&](int64_t lo, int64_t hi) {
          // the last tensor starting at or before unit lo (empty tensors own no units)
          size_t k = std::upper_bound(first_unit.begin(), first_unit.end(), lo) - first_unit.begin() - 1;
          for (; k < tensors.size() && first_unit[k] < hi; ++k) {
            const int64_t numel = tensors[k].param.numel();
            const int64_t begin = (std::max(lo, first_unit[k]) - first_unit[k]) * kUnit;
            const int64_t end = std::min(numel, (std::min(hi, first_unit[k + 1]) - first_unit[k]) * kUnit);
            if (begin < end) {
              run_chunk<scalar_t>(tensors[k], begin, end, hyper,
                                  static_cast<opmath_of<scalar_t>>(grad_mul));
            }
          }
        });
      });
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CPU, m) {
  m.impl("mackay_adam_step_", &mackay::mackay_adam_step_op<&mackay::mackay_adam_kernel_cpu>);
}
