// CPU kernel of batched_svd: LAPACK (gesdd) through ATen, which already loops over the batch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../batched_svd_common.h"

namespace intruder_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_svd_cpu(const at::Tensor& A) {
  check_batched_svd_input(A);
  auto [U, S, Vh] = at::linalg_svd(A, /*full_matrices=*/false);
  return {U, S, Vh};
}

}  // namespace

TORCH_LIBRARY_IMPL(intruder_ext, CPU, m) { m.impl("batched_svd", &batched_svd_cpu); }

}  // namespace intruder_ext
