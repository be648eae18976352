// Validation and shape logic of max_cosine, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

namespace intruder_ext {

// Y (..., d, k) and X (..., d, n) broadcast over their leading dims and viewed as 3-D.
struct MaxCosineProblem {
  at::Tensor Y;                    // (batch, d, k); stride 0 where it was broadcast
  at::Tensor X;                    // (batch, d, n)
  std::vector<int64_t> out_shape;  // (..., k)
  int64_t batch, d, k, n;
};

// Checks the inputs with errors that name the argument and the values received.
MaxCosineProblem prepare_max_cosine(const at::Tensor& Y, const at::Tensor& X);

// Accumulation type: float32 for float16/bfloat16/float32, float64 for float64.
inline at::ScalarType max_cosine_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace intruder_ext
