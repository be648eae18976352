// CPU kernel of batched_svd: LAPACK (gesdd) through ATen, which already loops over the batch.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace intruder_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_svd_cpu(const at::Tensor& A) {
  TORCH_CHECK_VALUE(A.dim() >= 2, "batched_svd: A must have at least 2 dims (..., m, n) (got shape ",
                    A.sizes(), ")");
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
                   "batched_svd: A must be float32 or float64 (got ", A.scalar_type(), ")");
  auto [U, S, Vh] = at::linalg_svd(A, /*full_matrices=*/false);
  return {U, S, Vh};
}

}  // namespace

TORCH_LIBRARY_IMPL(intruder_ext, CPU, m) { m.impl("batched_svd", &batched_svd_cpu); }

}  // namespace intruder_ext
