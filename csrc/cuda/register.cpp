// Registers the CUDA kernels (launchers live in the .cu files, which stay free of
// torch/library.h to keep nvcc's work small).
#include <torch/library.h>

#include "launchers.h"

TORCH_LIBRARY_IMPL(mackay_ext, CUDA, m) {
  m.impl("mackay_update_", &mackay::mackay_update_op<&mackay::mackay_update_kernel_cuda>);
  m.impl("mackay_adam_step_", &mackay::mackay_adam_step_op<&mackay::mackay_adam_kernel_cuda>);
  m.impl("csr_matmul", &mackay::csr_matmul_cuda);
  m.impl("csr_sddmm", &mackay::csr_sddmm_cuda);
  m.impl("sq_gemm_accumulate_", &mackay::sq_gemm_accumulate_cuda);
  m.impl("adam_proximal_prior_", &mackay::adam_proximal_prior_cuda);
}
