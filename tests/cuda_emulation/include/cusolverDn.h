// An emulation of the part of cuSOLVER's dense API that csrc/cuda/batched_svd_gesvdj.h calls, so
// that file can be built with a plain C++ compiler and run on CPU memory (tests/test_batched_svd.py).
//
// Same names, types and signatures as <cusolverDn.h>, and the documented contract: column-major
// storage with leading dimensions; gesvdjBatched limited to m, n <= 32, its matrices packed one
// after another, full U (m x m) and V (n x n); gesvdj with economy (econ = 1) or full output; V
// returned, not V^T; singular values sorted descending (gesvdj always, gesvdjBatched unless
// sorting is turned off); info = min(m, n) + 1 for a matrix that did not converge within the sweep
// limit; A destroyed on exit; CUSOLVER_STATUS_INVALID_VALUE for bad sizes, leading dimensions, a
// missing or short workspace.
//
// The solver is a real one-sided (Hestenes) Jacobi SVD in double precision: each sweep rotates
// every pair of columns that is not orthogonal to within the tolerance, and the iteration has
// converged after a sweep without a rotation. A low sweep limit therefore leaves a random matrix
// unconverged, as on a GPU, with its partial results in the outputs.
//
// Not emulated: streams and asynchrony (a call completes before it returns), wide matrices (the
// project passes only tall ones; m < n returns CUSOLVER_STATUS_NOT_SUPPORTED here), complex types.
// The functions have C++ linkage, unlike the real C API, so they can never bind to a libcusolver
// loaded in the same process.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

typedef enum {
  CUSOLVER_STATUS_SUCCESS = 0,
  CUSOLVER_STATUS_NOT_INITIALIZED = 1,
  CUSOLVER_STATUS_ALLOC_FAILED = 2,
  CUSOLVER_STATUS_INVALID_VALUE = 3,
  CUSOLVER_STATUS_ARCH_MISMATCH = 4,
  CUSOLVER_STATUS_MAPPING_ERROR = 5,
  CUSOLVER_STATUS_EXECUTION_FAILED = 6,
  CUSOLVER_STATUS_INTERNAL_ERROR = 7,
  CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED = 8,
  CUSOLVER_STATUS_NOT_SUPPORTED = 9,
  CUSOLVER_STATUS_INVALID_WORKSPACE = 31
} cusolverStatus_t;

typedef enum { CUSOLVER_EIG_MODE_NOVECTOR = 0, CUSOLVER_EIG_MODE_VECTOR = 1 } cusolverEigMode_t;

struct cusolverDnContext {};
typedef cusolverDnContext* cusolverDnHandle_t;

struct gesvdjInfo {
  double tolerance = 0;  // 0: the machine epsilon of the routine's type
  int max_sweeps = 100;
  int sort = 1;
};
typedef gesvdjInfo* gesvdjInfo_t;

inline cusolverStatus_t cusolverDnCreateGesvdjInfo(gesvdjInfo_t* info) {
  if (info == nullptr) return CUSOLVER_STATUS_INVALID_VALUE;
  *info = new gesvdjInfo();
  return CUSOLVER_STATUS_SUCCESS;
}

inline cusolverStatus_t cusolverDnDestroyGesvdjInfo(gesvdjInfo_t info) {
  delete info;
  return CUSOLVER_STATUS_SUCCESS;
}

inline cusolverStatus_t cusolverDnXgesvdjSetTolerance(gesvdjInfo_t info, double tolerance) {
  if (info == nullptr || !(tolerance >= 0)) return CUSOLVER_STATUS_INVALID_VALUE;
  info->tolerance = tolerance;
  return CUSOLVER_STATUS_SUCCESS;
}

inline cusolverStatus_t cusolverDnXgesvdjSetMaxSweeps(gesvdjInfo_t info, int max_sweeps) {
  if (info == nullptr || max_sweeps < 1) return CUSOLVER_STATUS_INVALID_VALUE;
  info->max_sweeps = max_sweeps;
  return CUSOLVER_STATUS_SUCCESS;
}

inline cusolverStatus_t cusolverDnXgesvdjSetSortEig(gesvdjInfo_t info, int sort_svd) {
  if (info == nullptr) return CUSOLVER_STATUS_INVALID_VALUE;
  info->sort = sort_svd;
  return CUSOLVER_STATUS_SUCCESS;
}

namespace cusolver_emu {

// Argument checks shared by every gesvdj entry point.
inline cusolverStatus_t check_args(cusolverDnHandle_t handle, cusolverEigMode_t jobz, int m, int n,
                                   int lda, int ldu, int ldv, gesvdjInfo_t params, bool batched) {
  if (handle == nullptr) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (params == nullptr || (jobz != CUSOLVER_EIG_MODE_VECTOR && jobz != CUSOLVER_EIG_MODE_NOVECTOR))
    return CUSOLVER_STATUS_INVALID_VALUE;
  if (m < 0 || n < 0 || lda < std::max(1, m)) return CUSOLVER_STATUS_INVALID_VALUE;
  if (jobz == CUSOLVER_EIG_MODE_VECTOR && (ldu < std::max(1, m) || ldv < std::max(1, n)))
    return CUSOLVER_STATUS_INVALID_VALUE;
  if (batched && (m > 32 || n > 32)) return CUSOLVER_STATUS_INVALID_VALUE;
  if (m < n) return CUSOLVER_STATUS_NOT_SUPPORTED;
  return CUSOLVER_STATUS_SUCCESS;
}

// Workspace the emulation asks for (in elements): the size of A plus V, as a real solver might.
inline int workspace_size(int m, int n) { return std::max(1, m * n + n * n); }

// Column c of a column-major matrix with leading dimension ld.
inline double* column(std::vector<double>& a, int ld, int c) { return a.data() + static_cast<size_t>(c) * ld; }

inline double dot(const double* x, const double* y, int len) {
  double s = 0;
  for (int i = 0; i < len; ++i) s += x[i] * y[i];
  return s;
}

inline void rotate(double* x, double* y, int len, double c, double s) {
  for (int i = 0; i < len; ++i) {
    const double xi = x[i], yi = y[i];
    x[i] = c * xi - s * yi;
    y[i] = s * xi + c * yi;
  }
}

// One-sided Jacobi on the tall m x n matrix a (column-major, ld m), rotations accumulated in v
// (n x n). Returns whether a sweep without rotations was reached within max_sweeps.
inline bool jacobi(int m, int n, std::vector<double>& a, std::vector<double>& v, double tol,
                   int max_sweeps) {
  v.assign(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) v[static_cast<size_t>(i) * n + i] = 1.0;
  // Rounding leaves |a_i . a_j| near m eps ||a_i|| ||a_j|| at best: a tighter tolerance is unreachable.
  const double threshold = std::max(tol, m * std::numeric_limits<double>::epsilon());
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    bool rotated = false;
    for (int i = 0; i + 1 < n; ++i) {
      for (int j = i + 1; j < n; ++j) {
        double* ai = column(a, m, i);
        double* aj = column(a, m, j);
        const double alpha = dot(ai, ai, m), beta = dot(aj, aj, m), gamma = dot(ai, aj, m);
        if (alpha == 0 || beta == 0 || std::abs(gamma) <= threshold * std::sqrt(alpha * beta)) continue;
        rotated = true;
        // The rotation that makes the pair orthogonal, with |t| <= 1 (Demmel and Veselic).
        const double zeta = (beta - alpha) / (2 * gamma);
        const double t = std::copysign(1.0, zeta) / (std::abs(zeta) + std::sqrt(1 + zeta * zeta));
        const double c = 1 / std::sqrt(1 + t * t), s = c * t;
        rotate(ai, aj, m, c, s);
        rotate(column(v, n, i), column(v, n, j), n, c, s);
      }
    }
    if (!rotated) return true;
  }
  return false;
}

// Appends x to the orthonormal m-vectors q after removing its components along them (twice: one
// Gram-Schmidt pass is not enough in floating point); false, appending nothing, when less than
// `keep` of its norm is left.
inline bool append_orthogonal(int m, std::vector<double>& q, std::vector<double> x, double keep) {
  const double norm0 = std::sqrt(dot(x.data(), x.data(), m));
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t c = 0; c < q.size() / m; ++c) {
      const double* qc = q.data() + c * m;
      const double proj = dot(qc, x.data(), m);
      for (int i = 0; i < m; ++i) x[i] -= proj * qc[i];
    }
  }
  const double norm = std::sqrt(dot(x.data(), x.data(), m));
  if (norm0 == 0 || norm <= keep * norm0) return false;
  for (double& v : x) v /= norm;
  q.insert(q.end(), x.begin(), x.end());
  return true;
}

// Appends the unit vector that is least in span(q): one always has at least 1/sqrt(m) of it left.
inline void append_completion(int m, std::vector<double>& q) {
  int best = 0;
  double best_left = -1;
  for (int i = 0; i < m; ++i) {
    double in_span = 0;
    for (size_t c = 0; c < q.size() / m; ++c) in_span += q[c * m + i] * q[c * m + i];
    if (1 - in_span > best_left) {
      best_left = 1 - in_span;
      best = i;
    }
  }
  std::vector<double> e(m, 0.0);
  e[best] = 1.0;
  append_orthogonal(m, q, e, 0.0);
}

// `want` orthonormal columns: those of `cols` (in order), a column that is (nearly) dependent on
// the earlier ones -- a zero singular value's -- replaced by a completion vector, then completion
// vectors up to `want`. So U is orthonormal even for a rank-deficient A.
inline std::vector<double> orthonormal_columns(int m, const std::vector<std::vector<double>>& cols,
                                               int want) {
  std::vector<double> q;
  for (const std::vector<double>& c : cols) {
    if (!append_orthogonal(m, q, c, 0.5)) append_completion(m, q);
  }
  while (static_cast<int>(q.size() / m) < want) append_completion(m, q);
  return q;
}

// The SVD of one tall column-major m x n matrix; returns info (0, or n + 1 if not converged).
template <typename T>
int gesvdj_one(cusolverEigMode_t jobz, bool full, int m, int n, T* A, int lda, T* S, T* U, int ldu,
               T* V, int ldv, const gesvdjInfo& params, bool sort) {
  std::vector<double> a(static_cast<size_t>(m) * n), v;
  for (int c = 0; c < n; ++c)
    for (int r = 0; r < m; ++r) a[static_cast<size_t>(c) * m + r] = A[static_cast<size_t>(c) * lda + r];
  const double tol = params.tolerance > 0 ? params.tolerance : std::numeric_limits<T>::epsilon();
  const bool converged = jacobi(m, n, a, v, tol, params.max_sweeps);

  std::vector<double> sigma(n);
  for (int c = 0; c < n; ++c) sigma[c] = std::sqrt(dot(column(a, m, c), column(a, m, c), m));
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (sort) std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return sigma[x] > sigma[y]; });
  for (int j = 0; j < n; ++j) S[j] = static_cast<T>(sigma[order[j]]);

  if (jobz == CUSOLVER_EIG_MODE_VECTOR) {
    std::vector<std::vector<double>> left;
    for (int j = 0; j < n; ++j) {
      const double* col = column(a, m, order[j]);
      left.emplace_back(col, col + m);
    }
    const int u_cols = full ? m : n;
    const std::vector<double> q = orthonormal_columns(m, left, u_cols);
    for (int c = 0; c < u_cols; ++c)
      for (int r = 0; r < m; ++r) U[static_cast<size_t>(c) * ldu + r] = static_cast<T>(q[static_cast<size_t>(c) * m + r]);
    for (int c = 0; c < n; ++c)
      for (int r = 0; r < n; ++r)
        V[static_cast<size_t>(c) * ldv + r] = static_cast<T>(v[static_cast<size_t>(order[c]) * n + r]);
  }
  // "On exit, the contents of A are destroyed."
  for (int c = 0; c < n; ++c)
    for (int r = 0; r < m; ++r) A[static_cast<size_t>(c) * lda + r] = std::numeric_limits<T>::quiet_NaN();
  return converged ? 0 : n + 1;
}

template <typename T>
cusolverStatus_t batched_buffer_size(cusolverDnHandle_t handle, cusolverEigMode_t jobz, int m, int n,
                                     int lda, int ldu, int ldv, int* lwork, gesvdjInfo_t params,
                                     int batch) {
  const cusolverStatus_t st = check_args(handle, jobz, m, n, lda, ldu, ldv, params, /*batched=*/true);
  if (st != CUSOLVER_STATUS_SUCCESS) return st;
  if (lwork == nullptr || batch < 0) return CUSOLVER_STATUS_INVALID_VALUE;
  *lwork = workspace_size(m, n) * std::max(batch, 1);
  return CUSOLVER_STATUS_SUCCESS;
}

template <typename T>
cusolverStatus_t batched(cusolverDnHandle_t handle, cusolverEigMode_t jobz, int m, int n, T* A,
                         int lda, T* S, T* U, int ldu, T* V, int ldv, T* work, int lwork, int* info,
                         gesvdjInfo_t params, int batch) {
  const cusolverStatus_t st = check_args(handle, jobz, m, n, lda, ldu, ldv, params, /*batched=*/true);
  if (st != CUSOLVER_STATUS_SUCCESS) return st;
  if (batch < 0 || info == nullptr || work == nullptr || lwork < workspace_size(m, n) * std::max(batch, 1))
    return CUSOLVER_STATUS_INVALID_VALUE;
  const int p = std::min(m, n);
  for (int b = 0; b < batch; ++b) {
    info[b] = gesvdj_one(jobz, /*full=*/true, m, n, A + static_cast<size_t>(b) * lda * n, lda,
                         S + static_cast<size_t>(b) * p, U + static_cast<size_t>(b) * ldu * m, ldu,
                         V + static_cast<size_t>(b) * ldv * n, ldv, *params, params->sort != 0);
  }
  return CUSOLVER_STATUS_SUCCESS;
}

template <typename T>
cusolverStatus_t single_buffer_size(cusolverDnHandle_t handle, cusolverEigMode_t jobz, int econ, int m,
                                    int n, int lda, int ldu, int ldv, int* lwork, gesvdjInfo_t params) {
  const cusolverStatus_t st = check_args(handle, jobz, m, n, lda, ldu, ldv, params, /*batched=*/false);
  if (st != CUSOLVER_STATUS_SUCCESS) return st;
  if (lwork == nullptr || (econ != 0 && econ != 1)) return CUSOLVER_STATUS_INVALID_VALUE;
  *lwork = workspace_size(m, n);
  return CUSOLVER_STATUS_SUCCESS;
}

template <typename T>
cusolverStatus_t single(cusolverDnHandle_t handle, cusolverEigMode_t jobz, int econ, int m, int n,
                        T* A, int lda, T* S, T* U, int ldu, T* V, int ldv, T* work, int lwork,
                        int* info, gesvdjInfo_t params) {
  const cusolverStatus_t st = check_args(handle, jobz, m, n, lda, ldu, ldv, params, /*batched=*/false);
  if (st != CUSOLVER_STATUS_SUCCESS) return st;
  if ((econ != 0 && econ != 1) || info == nullptr || work == nullptr || lwork < workspace_size(m, n))
    return CUSOLVER_STATUS_INVALID_VALUE;
  // gesvdj always sorts.
  *info = gesvdj_one(jobz, /*full=*/econ == 0, m, n, A, lda, S, U, ldu, V, ldv, *params, true);
  return CUSOLVER_STATUS_SUCCESS;
}

}  // namespace cusolver_emu

#define INTRUDER_EXT_CUSOLVER_EMU_ROUTINES(P, T)                                                   \
  inline cusolverStatus_t cusolverDn##P##gesvdjBatched_bufferSize(                                 \
      cusolverDnHandle_t handle, cusolverEigMode_t jobz, int m, int n, const T*, int lda, const T*, \
      const T*, int ldu, const T*, int ldv, int* lwork, gesvdjInfo_t params, int batchSize) {       \
    return cusolver_emu::batched_buffer_size<T>(handle, jobz, m, n, lda, ldu, ldv, lwork, params,   \
                                                batchSize);                                         \
  }                                                                                                 \
  inline cusolverStatus_t cusolverDn##P##gesvdjBatched(                                            \
      cusolverDnHandle_t handle, cusolverEigMode_t jobz, int m, int n, T* A, int lda, T* S, T* U,   \
      int ldu, T* V, int ldv, T* work, int lwork, int* info, gesvdjInfo_t params, int batchSize) {  \
    return cusolver_emu::batched<T>(handle, jobz, m, n, A, lda, S, U, ldu, V, ldv, work, lwork,     \
                                    info, params, batchSize);                                       \
  }                                                                                                 \
  inline cusolverStatus_t cusolverDn##P##gesvdj_bufferSize(                                        \
      cusolverDnHandle_t handle, cusolverEigMode_t jobz, int econ, int m, int n, const T*, int lda, \
      const T*, const T*, int ldu, const T*, int ldv, int* lwork, gesvdjInfo_t params) {            \
    return cusolver_emu::single_buffer_size<T>(handle, jobz, econ, m, n, lda, ldu, ldv, lwork,      \
                                               params);                                             \
  }                                                                                                 \
  inline cusolverStatus_t cusolverDn##P##gesvdj(                                                   \
      cusolverDnHandle_t handle, cusolverEigMode_t jobz, int econ, int m, int n, T* A, int lda,     \
      T* S, T* U, int ldu, T* V, int ldv, T* work, int lwork, int* info, gesvdjInfo_t params) {     \
    return cusolver_emu::single<T>(handle, jobz, econ, m, n, A, lda, S, U, ldu, V, ldv, work,       \
                                   lwork, info, params);                                            \
  }

INTRUDER_EXT_CUSOLVER_EMU_ROUTINES(S, float)
INTRUDER_EXT_CUSOLVER_EMU_ROUTINES(D, double)
#undef INTRUDER_EXT_CUSOLVER_EMU_ROUTINES
