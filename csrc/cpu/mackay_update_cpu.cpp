// CPU kernels of mackay_ext::mackay_update_: groups in parallel, at::vec lanes where the
// layout allows (one alpha per weight, or groups laid side by side / along a row).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "mackay/update_driver.h"
#include "precision_vec.h"

namespace mackay {
namespace {

struct Partial {
  double gamma = 0;
  int64_t pruned = 0;
};

template <typename scalar_t, typename alpha_t>
struct Layout {
  scalar_t* weight;
  const scalar_t* curvature;
  alpha_t* alpha;
  int64_t group_size;
  int64_t w_group_stride, w_elem_stride, h_group_stride, h_elem_stride, a_stride;

  explicit Layout(const GroupProblem& pr)
      : weight(pr.weight2d.data_ptr<scalar_t>()),
        curvature(pr.curvature2d.const_data_ptr<scalar_t>()),
        alpha(pr.alpha1d.data_ptr<alpha_t>()),
        group_size(pr.weight2d.size(1)),
        w_group_stride(pr.weight2d.stride(0)),
        w_elem_stride(pr.weight2d.stride(1)),
        h_group_stride(pr.curvature2d.stride(0)),
        h_elem_stride(pr.curvature2d.stride(1)),
        a_stride(pr.alpha1d.stride(0)) {}

  // Groups side by side in memory: lane k of a vector holds group g + k.
  bool groups_in_lanes() const {
    return w_group_stride == 1 && h_group_stride == 1 && a_stride == 1;
  }
  // Each group is a contiguous row.
  bool groups_in_rows() const { return w_elem_stride == 1 && h_elem_stride == 1; }
};

// Any layout and dtype: one group at a time, math in opmath_t.
template <typename scalar_t, typename alpha_t, typename opmath_t>
void update_groups_scalar(const Layout<scalar_t, alpha_t>& L, const UpdateParams& p,
                          int64_t begin, int64_t end, Partial& out) {
  for (int64_t g = begin; g < end; ++g) {
    opmath_t gamma;
    out.pruned += update_group<opmath_t>(L.weight + g * L.w_group_stride, L.w_elem_stride,
                                         L.curvature + g * L.h_group_stride, L.h_elem_stride,
                                         L.group_size, L.alpha + g * L.a_stride, p, gamma);
    out.gamma += static_cast<double>(gamma);
  }
}

// Number of full vector blocks summed in T before the partial moves to double.
constexpr int64_t kBlocksPerFlush = 256;

// Groups side by side (one alpha per weight, or per column): Vec<T>::size() groups per step.
// Handles the full blocks of [begin, end) and returns where the scalar tail starts.
template <typename T>
int64_t update_groups_lanes(const Layout<T, T>& L, const UpdateParams& p, int64_t begin,
                            int64_t end, Partial& out) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t n = L.group_size;
  const Vec<T> zero(T(0)), one(T(1)), inf(infinity<T>());
  Vec<T> gamma_acc = zero, pruned_acc = zero;
  int64_t blocks = 0;
  int64_t g = begin;
  for (; g + V <= end; g += V) {
    const Vec<T> old_alpha = Vec<T>::loadu(L.alpha + g);
    VecGroupSums<T> sums;
    for (int64_t j = 0; j < n; ++j) {
      accumulate(sums, Vec<T>::loadu(L.weight + g + j * L.w_elem_stride),
                 Vec<T>::loadu(L.curvature + g + j * L.h_elem_stride), old_alpha, p);
    }
    Vec<T> new_alpha = reestimate_alpha(sums, T(n), old_alpha, p);
    Vec<T> variance = zero;
    if (p.prune == Prune::SNR) {
      for (int64_t j = 0; j < n; ++j) {
        variance = variance +
                   variance_at(Vec<T>::loadu(L.curvature + g + j * L.h_elem_stride), new_alpha, p);
      }
    }
    const Vec<T> pruned = (old_alpha == inf) | should_prune(new_alpha, sums.weight_sq, variance, p);
    new_alpha = Vec<T>::blendv(new_alpha, inf, pruned);
    new_alpha.store(L.alpha + g);
    gamma_acc = gamma_acc + Vec<T>::blendv(sums.gamma, zero, pruned);
    pruned_acc = pruned_acc + (pruned & one);
    // zero_mask() has a bit for each lane equal to 0, i.e. each lane kept.
    if (pruned.zero_mask() != (1 << V) - 1) {
      for (int64_t j = 0; j < n; ++j) {
        T* w = L.weight + g + j * L.w_elem_stride;
        Vec<T>::blendv(Vec<T>::loadu(w), zero, pruned).store(w);
      }
    }
    if (++blocks == kBlocksPerFlush || g + 2 * V > end) {
      out.gamma += static_cast<double>(at::vec::vec_reduce_all(
          [](Vec<T>& a, Vec<T>& b) { return a + b; }, gamma_acc));
      out.pruned += static_cast<int64_t>(at::vec::vec_reduce_all(
          [](Vec<T>& a, Vec<T>& b) { return a + b; }, pruned_acc));
      gamma_acc = zero;
      pruned_acc = zero;
      blocks = 0;
    }
  }
  return g;
}

// Sum of f over a contiguous row: vector body, scalar tail (a zero-filled tail lane would
// read as alpha-free weight and count gamma = 1).
template <typename T>
void row_sums(const T* w, const T* h, int64_t n, T alpha, const UpdateParams& p,
              GroupSums<T>& sums) {
  constexpr int64_t V = Vec<T>::size();
  VecGroupSums<T> vsums;
  const Vec<T> valpha(alpha);
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    accumulate(vsums, Vec<T>::loadu(w + j), Vec<T>::loadu(h + j), valpha, p);
  }
  auto add = [](Vec<T>& a, Vec<T>& b) { return a + b; };
  sums.gamma = at::vec::vec_reduce_all(add, vsums.gamma);
  sums.weight_sq = at::vec::vec_reduce_all(add, vsums.weight_sq);
  sums.variance = at::vec::vec_reduce_all(add, vsums.variance);
  for (; j < n; ++j) accumulate<T>(sums, w[j], h[j], alpha, p);
}

template <typename T>
T row_variance(const T* h, int64_t n, T alpha, const UpdateParams& p) {
  constexpr int64_t V = Vec<T>::size();
  Vec<T> acc(T(0));
  const Vec<T> valpha(alpha);
  int64_t j = 0;
  for (; j + V <= n; j += V) acc = acc + variance_at(Vec<T>::loadu(h + j), valpha, p);
  T total = at::vec::vec_reduce_all([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; j < n; ++j) total += variance_at<T>(h[j], alpha, p);
  return total;
}

// Each group a contiguous row: vector reductions along the row.
template <typename T>
void update_groups_rows(const Layout<T, T>& L, const UpdateParams& p, int64_t begin,
                        int64_t end, Partial& out) {
  const int64_t n = L.group_size;
  for (int64_t g = begin; g < end; ++g) {
    T* alpha = L.alpha + g * L.a_stride;
    T* w = L.weight + g * L.w_group_stride;
    const T* h = L.curvature + g * L.h_group_stride;
    const T old_alpha = *alpha;
    bool pruned = old_alpha == infinity<T>();
    GroupSums<T> sums;
    if (!pruned) {
      row_sums(w, h, n, old_alpha, p, sums);
      const T new_alpha = reestimate_alpha(sums, T(n), old_alpha, p);
      const T variance = p.prune == Prune::SNR ? row_variance(h, n, new_alpha, p) : T(0);
      pruned = should_prune(new_alpha, sums.weight_sq, variance, p);
      *alpha = new_alpha;
    }
    if (pruned) {
      *alpha = infinity<T>();
      std::fill(w, w + n, T(0));
      out.pruned += 1;
    } else {
      out.gamma += static_cast<double>(sums.gamma);
    }
  }
}

template <typename scalar_t, typename alpha_t>
void update_range(const Layout<scalar_t, alpha_t>& L, const UpdateParams& p, int64_t begin,
                  int64_t end, Partial& out) {
  using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double> ||
                                          std::is_same_v<alpha_t, double>, double, float>;
  if constexpr (std::is_same_v<scalar_t, alpha_t> && std::is_same_v<scalar_t, opmath_t>) {
    if (L.groups_in_lanes()) {
      begin = update_groups_lanes(L, p, begin, end, out);
    } else if (L.groups_in_rows() && L.group_size >= Vec<scalar_t>::size()) {
      update_groups_rows(L, p, begin, end, out);
      return;
    }
  }
  update_groups_scalar<scalar_t, alpha_t, opmath_t>(L, p, begin, end, out);
}

void mackay_update_kernel_cpu(const GroupProblem& problem, const UpdateParams& params,
                              at::Tensor& gamma_sum, at::Tensor& num_pruned) {
  const int64_t groups = problem.weight2d.size(0);
  const int64_t group_size = problem.weight2d.size(1);
  // ~32K elements per task keeps both the per-weight and the per-row case worth a thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(group_size, 1));
  std::vector<Partial> partials(at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, problem.weight2d.scalar_type(), "mackay_update_cpu", [&] {
        using weight_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(problem.alpha1d.scalar_type(), "mackay_update_cpu_alpha", [&] {
          const Layout<weight_t, scalar_t> layout(problem);
          at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
            update_range(layout, params, begin, end, partials[at::get_thread_num()]);
          });
        });
      });
  double gamma = 0;
  int64_t pruned = 0;
  for (const Partial& part : partials) {
    gamma += part.gamma;
    pruned += part.pruned;
  }
  gamma_sum.fill_(gamma);
  num_pruned.fill_(pruned);
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CPU, m) {
  m.impl("mackay_update_", &mackay::mackay_update_op<&mackay::mackay_update_kernel_cpu>);
}
