// Small helpers for calling cuSOLVER from the CUDA kernels: status checks whose message names the
// failing call and the status, and an owning wrapper of gesvdjInfo_t. Internal linkage, like
// batched_svd_gesvdj.h, which includes it: the CUDA build and the emulated one share no symbols.
#pragma once
#include <c10/util/Exception.h>
#include <cusolverDn.h>

namespace intruder_ext {
namespace {

inline const char* cusolver_status_name(cusolverStatus_t status) {
  switch (status) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_MAPPING_ERROR: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    case CUSOLVER_STATUS_INVALID_WORKSPACE: return "CUSOLVER_STATUS_INVALID_WORKSPACE";
    default: return "an unlisted cusolverStatus_t";
  }
}

// Raises a RuntimeError naming the op, the cuSOLVER function and the status it returned.
inline void check_cusolver(cusolverStatus_t status, const char* op, const char* call) {
  TORCH_CHECK(status == CUSOLVER_STATUS_SUCCESS, op, ": ", call, " failed with ",
              cusolver_status_name(status), " (", static_cast<int>(status), ")");
}

// Owns a gesvdjInfo_t (tolerance, sweep limit, sorting) for the duration of one op call.
class GesvdjParams {
 public:
  explicit GesvdjParams(const char* op) {
    check_cusolver(cusolverDnCreateGesvdjInfo(&info_), op, "cusolverDnCreateGesvdjInfo");
  }
  ~GesvdjParams() { cusolverDnDestroyGesvdjInfo(info_); }
  GesvdjParams(const GesvdjParams&) = delete;
  GesvdjParams& operator=(const GesvdjParams&) = delete;
  gesvdjInfo_t get() const { return info_; }

 private:
  gesvdjInfo_t info_ = nullptr;
};

}  // namespace
}  // namespace intruder_ext
