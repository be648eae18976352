// CUDA launcher of max_cosine: the fused kernel in max_cosine_kernel.cuh, one launch per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../max_cosine_common.h"
#include "max_cosine_kernel.cuh"

namespace intruder_ext {
namespace {

namespace mc = max_cosine_cuda;

template <typename scalar_t>
void launch(const MaxCosineProblem& p, bool absolute, bool normalize, at::Tensor& values,
            at::Tensor& indices) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto kernel = mc::max_cosine_kernel<scalar_t, acc_t>;
  // Aim at one full wave of resident blocks: n is split across blocks only as far as needed.
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, mc::kThreads, 0));
  const int64_t target =
      static_cast<int64_t>(std::max(blocks_per_sm, 1)) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const mc::LaunchConfig c = mc::launch_config(p.batch, p.k, p.n, target);

  const at::TensorOptions opts = p.Y.options();
  at::Tensor partial_values, partial_indices, counters;
  if (c.splits > 1) {
    partial_values = at::empty({c.workspace_entries}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
    partial_indices = at::empty({c.workspace_entries}, opts.dtype(at::kLong));
    counters = at::zeros({c.counters}, opts.dtype(at::kInt));
  }
  mc::Params params{};
  params.Y = p.Y.const_data_ptr<scalar_t>();
  params.X = p.X.const_data_ptr<scalar_t>();
  params.batch = p.batch;
  params.d = p.d;
  params.k = p.k;
  params.n = p.n;
  params.y_sb = p.Y.stride(0);
  params.y_sd = p.Y.stride(1);
  params.y_sk = p.Y.stride(2);
  params.x_sb = p.X.stride(0);
  params.x_sd = p.X.stride(1);
  params.x_sn = p.X.stride(2);
  params.absolute = absolute;
  params.normalize = normalize;
  params.tiles_per_split = c.tiles_per_split;
  params.values = values.data_ptr<scalar_t>();
  params.indices = indices.data_ptr<int64_t>();
  if (c.splits > 1) {
    params.partial_values = partial_values.data_ptr<acc_t>();
    params.partial_indices = partial_indices.data_ptr<int64_t>();
    // Unsigned arrival counters, stored in an int32 tensor (same size, zero bits alike).
    params.counters = reinterpret_cast<unsigned int*>(counters.data_ptr<int32_t>());
  }
  const dim3 grid(static_cast<unsigned int>(c.k_tiles), static_cast<unsigned int>(c.splits),
                  static_cast<unsigned int>(c.batch_blocks));
  kernel<<<grid, mc::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> max_cosine_on_cuda(const at::Tensor& Y_in, const at::Tensor& X_in,
                                                      bool absolute, bool normalize) {
  // One of the two is on CUDA (that is why we are here); a mismatch is reported by prepare.
  const c10::cuda::CUDAGuard guard(Y_in.is_cuda() ? Y_in.device() : X_in.device());
  const MaxCosineProblem p = prepare_max_cosine(Y_in, X_in);
  at::Tensor values = at::empty({p.batch, p.k}, Y_in.options());
  at::Tensor indices = at::empty({p.batch, p.k}, Y_in.options().dtype(at::kLong));
  if (p.batch > 0 && p.k > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Y_in.scalar_type(), "max_cosine_cuda",
                                    [&] { launch<scalar_t>(p, absolute, normalize, values, indices); });
  }
  return {values.view(p.out_shape), indices.view(p.out_shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(intruder_ext, CUDA, m) { m.impl("max_cosine", &max_cosine_on_cuda); }

}  // namespace intruder_ext
