// Input checks of batched_svd, shared by the CPU and CUDA kernels so both raise the same errors.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace intruder_ext {

inline void check_batched_svd_input(const at::Tensor& A) {
  TORCH_CHECK_VALUE(A.dim() >= 2, "batched_svd: A must have at least 2 dims (..., m, n) (got shape ",
                    A.sizes(), ")");
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
                   "batched_svd: A must be float32 or float64 (got ", A.scalar_type(), ")");
}

}  // namespace intruder_ext
