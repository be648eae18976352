// Input checks of batched_svd, shared by the CPU and CUDA kernels so both raise the same errors.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <climits>
#include <vector>

namespace intruder_ext {

inline void check_batched_svd_input(const at::Tensor& A, int64_t max_sweeps) {
  TORCH_CHECK_VALUE(A.dim() >= 2, "batched_svd: A must have at least 2 dims (..., m, n) (got shape ",
                    A.sizes(), ")");
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
                   "batched_svd: A must be float32 or float64 (got ", A.scalar_type(), ")");
  TORCH_CHECK_VALUE(max_sweeps >= 1 && max_sweeps <= INT_MAX,
                    "batched_svd: max_sweeps must be a positive int (got ", max_sweeps, ")");
}

// The (...) batch shape of a (..., m, n) stack, as a vector to extend.
inline std::vector<int64_t> batch_shape_of(const at::Tensor& A) {
  return std::vector<int64_t>(A.sizes().begin(), A.sizes().end() - 2);
}

}  // namespace intruder_ext
