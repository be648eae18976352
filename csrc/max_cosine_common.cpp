#include "max_cosine_common.h"

#include <algorithm>
#include <c10/util/Exception.h>

#include <limits>

namespace intruder_ext {

namespace {
bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::Tensor as_3d(const at::Tensor& t, at::IntArrayRef batch_shape, int64_t batch) {
  std::vector<int64_t> shape(batch_shape.begin(), batch_shape.end());
  shape.push_back(t.size(-2));
  shape.push_back(t.size(-1));
  // expand() gives stride 0 on broadcast dims; reshape keeps that a view where it can.
  return t.expand(shape).reshape({batch, t.size(-2), t.size(-1)});
}
}  // namespace

MaxCosineProblem prepare_max_cosine(const at::Tensor& Y, const at::Tensor& X) {
  TORCH_CHECK_VALUE(Y.dim() >= 2, "max_cosine: Y must have at least 2 dims (..., d, k) (got shape ",
                    Y.sizes(), ")");
  TORCH_CHECK_VALUE(X.dim() >= 2, "max_cosine: X must have at least 2 dims (..., d, n) (got shape ",
                    X.sizes(), ")");
  TORCH_CHECK_TYPE(supported_dtype(Y.scalar_type()),
                   "max_cosine: Y must be float32, float64, float16 or bfloat16 (got ",
                   Y.scalar_type(), ")");
  TORCH_CHECK_TYPE(supported_dtype(X.scalar_type()),
                   "max_cosine: X must be float32, float64, float16 or bfloat16 (got ",
                   X.scalar_type(), ")");
  TORCH_CHECK_TYPE(Y.scalar_type() == X.scalar_type(),
                   "max_cosine: Y and X must have the same dtype (got ", Y.scalar_type(), " and ",
                   X.scalar_type(), ")");
  TORCH_CHECK_VALUE(Y.device() == X.device(), "max_cosine: Y and X must be on the same device (got ",
                    Y.device(), " and ", X.device(), ")");
  TORCH_CHECK_VALUE(Y.size(-2) == X.size(-2),
                    "max_cosine: Y and X must have the same number of rows (got ", Y.size(-2),
                    " and ", X.size(-2), ")");
  const auto y_batch = Y.sizes().slice(0, Y.dim() - 2);
  const auto x_batch = X.sizes().slice(0, X.dim() - 2);
  const size_t dims = std::max(y_batch.size(), x_batch.size());
  std::vector<int64_t> broadcast(dims);
  int64_t batch = 1;
  for (size_t i = 0; i < dims; ++i) {
    const int64_t ys = i + y_batch.size() >= dims ? y_batch[i + y_batch.size() - dims] : 1;
    const int64_t xs = i + x_batch.size() >= dims ? x_batch[i + x_batch.size() - dims] : 1;
    TORCH_CHECK_VALUE(ys == xs || ys == 1 || xs == 1,
                      "max_cosine: the leading (batch) dims of Y and X must broadcast (got shapes ",
                      Y.sizes(), " and ", X.sizes(), ")");
    broadcast[i] = ys == 1 ? xs : ys;
    batch *= broadcast[i];
  }

  MaxCosineProblem p;
  p.d = Y.size(-2);
  p.k = Y.size(-1);
  p.n = X.size(-1);
  p.batch = batch;
  TORCH_CHECK_VALUE(p.n > 0 || p.k == 0 || batch == 0,
                    "max_cosine: X must have at least one column to compare with (got shape ",
                    X.sizes(), ")");
  TORCH_CHECK_VALUE(p.n <= std::numeric_limits<int32_t>::max(),
                    "max_cosine: X may have at most 2^31 - 1 columns (got ", p.n, ")");
  p.Y = as_3d(Y, broadcast, batch);
  p.X = as_3d(X, broadcast, batch);
  p.out_shape.assign(broadcast.begin(), broadcast.end());
  p.out_shape.push_back(p.k);
  return p;
}

}  // namespace intruder_ext
