// CUDA kernel of batched_svd: the cuSOLVER Jacobi path of batched_svd_gesvdj.h on the current
// device and stream, with ATen's QR-based gesvd as the fallback for unconverged matrices.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "batched_svd_gesvdj.h"

namespace intruder_ext {
namespace {

CheckedSvdResult batched_svd_cuda(const at::Tensor& A, int64_t max_sweeps) {
  const c10::cuda::CUDAGuard device_guard(A.device());
  cusolverDnHandle_t handle = at::cuda::getCurrentCUDASolverDnHandle();
  check_cusolver(cusolverDnSetStream(handle, at::cuda::getCurrentCUDAStream()), kOp,
                 "cusolverDnSetStream");
  const GesvdjBackend backend{handle, [](const at::Tensor& M) -> SvdResult {
                                return at::linalg_svd(M, /*full_matrices=*/false, "gesvd");
                              }};
  return batched_svd_gesvdj(A, max_sweeps, backend);
}

}  // namespace

TORCH_LIBRARY_IMPL(intruder_ext, CUDA, m) { m.impl("batched_svd", &batched_svd_cuda); }

}  // namespace intruder_ext
