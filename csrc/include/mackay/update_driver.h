#pragma once
// Host-side driver of the precision update: validates the arguments, lays the weight out as
// [groups, group_size] (a view when strides allow, a working copy otherwise) and hands that
// to a device kernel. Shared by the CPU and CUDA registrations.
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "mackay/precision.h"

namespace mackay {

// One row per alpha entry: weight2d[g, j] is the j-th weight governed by alpha1d[g].
struct GroupProblem {
  at::Tensor weight2d;     // [G, n], may be non-contiguous
  at::Tensor curvature2d;  // [G, n], same dtype as weight2d
  at::Tensor alpha1d;      // [G], float32 or float64
};

// Accumulates sum(gamma) into gamma_sum (float64, 0-dim) and the count of pruned groups into
// num_pruned (int64, 0-dim); both start at 0 and live on the weight's device.
using GroupKernel = void (*)(const GroupProblem&, const UpdateParams&, at::Tensor& gamma_sum,
                             at::Tensor& num_pruned);

std::tuple<at::Tensor, at::Tensor> run_mackay_update(
    const at::Tensor& weight, const at::Tensor& curvature, const at::Tensor& alpha,
    double num_data, std::string_view rule, std::string_view prune,
    std::optional<double> threshold, double eps, double alpha_min,
    std::optional<double> alpha_max, GroupKernel kernel);

// The op's registered signature, for a device's kernel (see mackay_adam_step_op).
template <GroupKernel kKernel>
std::tuple<at::Tensor, at::Tensor> mackay_update_op(
    at::Tensor& weight, const at::Tensor& curvature, at::Tensor& alpha, double num_data,
    c10::string_view rule, c10::string_view prune, std::optional<double> threshold, double eps,
    double alpha_min, std::optional<double> alpha_max) {
  return run_mackay_update(weight, curvature, alpha, num_data,
                           std::string_view(rule.data(), rule.size()),
                           std::string_view(prune.data(), prune.size()), threshold, eps,
                           alpha_min, alpha_max, kKernel);
}

}  // namespace mackay
