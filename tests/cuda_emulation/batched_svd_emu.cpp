// The CUDA batched_svd (csrc/cuda/batched_svd_gesvdj.h: everything but the CUDA context) built
// against the emulated cuSOLVER in include/cusolverDn.h, and registered as the CPU op
// torch.ops.intruder_ext_emulation.batched_svd for tests/test_batched_svd.py.
#include <torch/library.h>

#include "../../csrc/cuda/batched_svd_gesvdj.h"

namespace {

cusolverDnContext emulated_context;

intruder_ext::CheckedSvdResult batched_svd_emulated(const at::Tensor& A, int64_t max_sweeps) {
  // The emulated solver's fallback is LAPACK: ATen takes a driver name on CUDA only.
  const intruder_ext::GesvdjBackend backend{
      &emulated_context, [](const at::Tensor& M) -> intruder_ext::SvdResult {
        return at::linalg_svd(M, /*full_matrices=*/false);
      }};
  return intruder_ext::batched_svd_gesvdj(A, max_sweeps, backend);
}

}  // namespace

TORCH_LIBRARY(intruder_ext_emulation, m) {
  m.def("batched_svd(Tensor A, int max_sweeps) -> (Tensor U, Tensor S, Tensor Vh, Tensor recomputed)");
  m.impl("batched_svd", c10::DispatchKey::CPU, TORCH_FN(batched_svd_emulated));
}
