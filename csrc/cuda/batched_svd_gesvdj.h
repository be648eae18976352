// batched_svd on cuSOLVER's Jacobi SVD (gesvdj): everything but the CUDA context.
//
// Host code only, written against <cusolverDn.h> and ATen: batched_svd_cuda.cu supplies the
// cuSOLVER handle (bound to the current stream) and the robust fallback driver; the tests build
// this same file against an emulated cuSOLVER (tests/cuda_emulation/include/cusolverDn.h) and run
// it on CPU tensors, so the layout and fallback logic below is executed without a GPU.
//
// Wide matrices are handled as their transposes (A^T = V S U^T: the factors swap back at the end),
// so the solver only sees tall m x n matrices (m >= n), stored column-major: each one is copied
// into the row-major (n, m) buffer of its transpose, which is also the copy the solver overwrites.
//  * m <= 32 (hence n <= 32): one gesvdjBatched call for the whole stack.
//  * larger: gesvdj with econ = 1, one call per matrix, all queued on the handle's stream before
//    a single sync. gesvdj is also PyTorch's default CUDA driver; the QR-based gesvd is slower on
//    GPUs and Xgesvdp trades accuracy of small singular values for speed. This choice has not been
//    timed against the others (no GPU has been available to this project).
// Jacobi can stop before it converges (info = min(m, n) + 1). Every matrix's info is read back and
// those matrices are recomputed with the robust driver and flagged in the op's `recomputed` output
// (the Python wrapper warns): never silently wrong.
//
// Included by exactly one translation unit per library: the unnamed namespace keeps the CUDA build
// and the emulated one from sharing symbols.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/accumulate.h>
#include <cusolverDn.h>

#include <algorithm>
#include <climits>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../batched_svd_common.h"
#include "cusolver_utils.h"

namespace intruder_ext {
namespace {

using SvdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// U, S, Vh and the (...) mask of matrices recomputed by the robust driver.
using CheckedSvdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// What the CUDA build (or the emulation) provides.
struct GesvdjBackend {
  cusolverDnHandle_t handle;  // already bound to the stream the work must run on
  // Thin SVD of a (batch, m, n) stack with a robust driver, for matrices Jacobi did not converge on.
  std::function<SvdResult(const at::Tensor&)> robust_svd;
};

constexpr const char* kOp = "batched_svd";
constexpr int64_t kBatchedMaxDim = 32;  // gesvdjBatched takes m, n <= 32

// The S (float) or D (double) routines, chosen by the scalar type.
template <typename T>
struct Gesvdj;

template <>
struct Gesvdj<float> {
  static constexpr auto batched_buffer_size = &cusolverDnSgesvdjBatched_bufferSize;
  static constexpr auto batched = &cusolverDnSgesvdjBatched;
  static constexpr auto buffer_size = &cusolverDnSgesvdj_bufferSize;
  static constexpr auto single = &cusolverDnSgesvdj;
  static constexpr const char* prefix = "cusolverDnS";
};

template <>
struct Gesvdj<double> {
  static constexpr auto batched_buffer_size = &cusolverDnDgesvdjBatched_bufferSize;
  static constexpr auto batched = &cusolverDnDgesvdjBatched;
  static constexpr auto buffer_size = &cusolverDnDgesvdj_bufferSize;
  static constexpr auto single = &cusolverDnDgesvdj;
  static constexpr const char* prefix = "cusolverDnD";
};

template <typename T>
void check(cusolverStatus_t status, const char* routine) {
  if (status != CUSOLVER_STATUS_SUCCESS) {
    const std::string call = std::string(Gesvdj<T>::prefix) + routine;
    check_cusolver(status, kOp, call.c_str());
  }
}

// Tall column-major matrices, `work` (batch, n, m) row-major, into U (batch, m, m) row-major
// (= column-major U^T, full as gesvdjBatched returns it), S (batch, n) and V (batch, n, n).
template <typename T>
void run_gesvdj_batched(cusolverDnHandle_t handle, gesvdjInfo_t params, at::Tensor& work,
                        at::Tensor& Ubuf, at::Tensor& S, at::Tensor& Vbuf, at::Tensor& info) {
  const int batch = static_cast<int>(work.size(0));
  const int n = static_cast<int>(work.size(1));
  const int m = static_cast<int>(work.size(2));
  int lwork = 0;
  check<T>(Gesvdj<T>::batched_buffer_size(handle, CUSOLVER_EIG_MODE_VECTOR, m, n,
                                          work.data_ptr<T>(), m, S.data_ptr<T>(),
                                          Ubuf.data_ptr<T>(), m, Vbuf.data_ptr<T>(), n, &lwork,
                                          params, batch),
           "gesvdjBatched_bufferSize");
  at::Tensor workspace = at::empty({std::max(lwork, 1)}, work.options());
  check<T>(Gesvdj<T>::batched(handle, CUSOLVER_EIG_MODE_VECTOR, m, n, work.data_ptr<T>(), m,
                              S.data_ptr<T>(), Ubuf.data_ptr<T>(), m, Vbuf.data_ptr<T>(), n,
                              workspace.data_ptr<T>(), lwork, info.data_ptr<int>(), params, batch),
           "gesvdjBatched");
}

// As above for larger matrices, with gesvdj's economy output: U is (batch, n, m) here.
template <typename T>
void run_gesvdj_each(cusolverDnHandle_t handle, gesvdjInfo_t params, at::Tensor& work,
                     at::Tensor& Ubuf, at::Tensor& S, at::Tensor& Vbuf, at::Tensor& info) {
  const int64_t batch = work.size(0);
  const int n = static_cast<int>(work.size(1));
  const int m = static_cast<int>(work.size(2));
  T* A = work.data_ptr<T>();
  T* s = S.data_ptr<T>();
  T* U = Ubuf.data_ptr<T>();
  T* V = Vbuf.data_ptr<T>();
  int lwork = 0;
  check<T>(Gesvdj<T>::buffer_size(handle, CUSOLVER_EIG_MODE_VECTOR, /*econ=*/1, m, n, A, m, s, U,
                                  m, V, n, &lwork, params),
           "gesvdj_bufferSize");
  // One workspace serves every call: they run one after another on the stream.
  at::Tensor workspace = at::empty({std::max(lwork, 1)}, work.options());
  const int64_t mn = static_cast<int64_t>(m) * n;
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t i = 0; i < batch; ++i) {
    check<T>(Gesvdj<T>::single(handle, CUSOLVER_EIG_MODE_VECTOR, /*econ=*/1, m, n, A + i * mn, m,
                               s + i * n, U + i * mn, m, V + i * nn, n, workspace.data_ptr<T>(),
                               lwork, info.data_ptr<int>() + i, params),
             "gesvdj");
  }
}

// Reads every matrix's info (this waits for the solver) and recomputes those that did not
// converge with the robust driver, writing them over the Jacobi results. Returns the (batch,)
// mask of recomputed matrices, on A's device.
at::Tensor recompute_unconverged(const at::Tensor& A, const at::Tensor& info, at::Tensor& U,
                                 at::Tensor& S, at::Tensor& Vh, const GesvdjBackend& backend) {
  const at::Tensor info_cpu = info.cpu();
  const int min_info = info_cpu.min().item<int>();
  TORCH_CHECK(min_info >= 0, kOp, ": internal error: cuSOLVER rejected argument ", -min_info,
              " of gesvdj");
  const at::Tensor unconverged = info_cpu.ne(0);
  const at::Tensor failed = unconverged.nonzero().squeeze(1);
  if (failed.numel() > 0) {
    const at::Tensor idx = failed.to(A.device());
    auto [Uf, Sf, Vhf] = backend.robust_svd(A.index_select(0, idx));
    U.index_put_({idx}, Uf);
    S.index_put_({idx}, Sf);
    Vh.index_put_({idx}, Vhf);
  }
  return unconverged.to(A.device());
}

// Thin SVD of a non-empty stack of tall matrices A (batch, m, n), m >= n.
CheckedSvdResult svd_tall(const at::Tensor& A, int max_sweeps, const GesvdjBackend& backend) {
  const int64_t batch = A.size(0), m = A.size(1), n = A.size(2);
  const bool one_call = m <= kBatchedMaxDim;
  // clone, not contiguous(): the solver overwrites its input, which may already be this layout.
  at::Tensor work = A.mT().clone(at::MemoryFormat::Contiguous);
  at::Tensor Ubuf = at::empty({batch, one_call ? m : n, m}, A.options());
  at::Tensor Vbuf = at::empty({batch, n, n}, A.options());
  at::Tensor S = at::empty({batch, n}, A.options());
  at::Tensor info = at::empty({batch}, A.options().dtype(at::kInt));

  const GesvdjParams params(kOp);
  check_cusolver(cusolverDnXgesvdjSetMaxSweeps(params.get(), max_sweeps), kOp,
                 "cusolverDnXgesvdjSetMaxSweeps");
  // gesvdjBatched sorts by default; ask for it anyway, since callers rely on the order.
  check_cusolver(cusolverDnXgesvdjSetSortEig(params.get(), 1), kOp, "cusolverDnXgesvdjSetSortEig");
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "batched_svd_gesvdj", [&] {
    check_cusolver(cusolverDnXgesvdjSetTolerance(params.get(),
                                                 std::numeric_limits<scalar_t>::epsilon()),
                   kOp, "cusolverDnXgesvdjSetTolerance");
    if (one_call) {
      run_gesvdj_batched<scalar_t>(backend.handle, params.get(), work, Ubuf, S, Vbuf, info);
    } else {
      run_gesvdj_each<scalar_t>(backend.handle, params.get(), work, Ubuf, S, Vbuf, info);
    }
  });
  // Row i of a buffer is column i of U (or V): U is the transposed first n rows; V^T is Vbuf.
  at::Tensor U = Ubuf.narrow(1, 0, n).mT();
  at::Tensor Vh = Vbuf;
  const at::Tensor recomputed = recompute_unconverged(A, info, U, S, Vh, backend);
  return {U, S, Vh, recomputed};
}

// batched_svd of a (..., m, n) float32/float64 stack on the backend's device.
CheckedSvdResult batched_svd_gesvdj(const at::Tensor& A, int64_t max_sweeps,
                                    const GesvdjBackend& backend) {
  check_batched_svd_input(A, max_sweeps);
  const int64_t m = A.size(-2), n = A.size(-1), p = std::min(m, n);
  const std::vector<int64_t> batch_shape = batch_shape_of(A);
  const int64_t batch = c10::multiply_integers(batch_shape);
  auto shape = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> s = batch_shape;
    s.insert(s.end(), tail);
    return s;
  };
  if (A.numel() == 0) {
    return {at::empty(shape({m, p}), A.options()), at::empty(shape({p}), A.options()),
            at::empty(shape({p, n}), A.options()),
            at::zeros(batch_shape, A.options().dtype(at::kBool))};
  }
  TORCH_CHECK_VALUE(std::max(m, n) <= INT_MAX && batch <= INT_MAX, kOp,
                    ": A may have at most 2^31 - 1 rows, columns and matrices on CUDA (got shape ",
                    A.sizes(), ")");
  const at::Tensor A3 = A.reshape({batch, m, n});
  auto [U, S, Vh, recomputed] = svd_tall(m >= n ? A3 : A3.mT(), static_cast<int>(max_sweeps), backend);
  if (m < n) {
    // A = (A^T)^T = (U' S V'^T)^T: U = V' and V^T = U'^T.
    std::tie(U, Vh) = std::make_tuple(Vh.mT(), U.mT());
  }
  return {U.reshape(shape({m, p})).contiguous(), S.reshape(shape({p})).contiguous(),
          Vh.reshape(shape({p, n})).contiguous(), recomputed.reshape(batch_shape)};
}

}  // namespace
}  // namespace intruder_ext
