#pragma once
// Host launchers defined in the .cu files; registered with the dispatcher from plain .cpp files
// so that nvcc never has to parse torch/library.h.
#include "mackay/update_driver.h"

namespace mackay {

void mackay_update_kernel_cuda(const GroupProblem& problem, const UpdateParams& params,
                               at::Tensor& gamma_sum, at::Tensor& num_pruned);

}  // namespace mackay
