// CPU kernel of max_cosine: never holds the k x n similarity matrix.
//
// The (batch, k, n) problem is cut into tiles of kTileK x kTileN dot products. Each tile is one
// GEMM through ATen/BLAS into a per-thread buffer that fits in L2, reduced to (max, argmax) per row
// while it is still in cache. Tasks (batch, k-tile, chunk of n-tiles) run in parallel; their
// partial maxima are combined in index order. Extra memory: one buffer per thread, the column
// norms, and k partials per n-chunk (at most one chunk per thread).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../max_cosine_common.h"

namespace intruder_ext {
namespace {

// 512 x 256 floats = 512 KiB of dot products per tile: in L2, and each GEMM call does enough
// flops per element of its operands that BLAS repacking them costs little.
constexpr int64_t kTileK = 512;
constexpr int64_t kTileN = 256;

// Order of candidates: NaN above everything (it propagates), then larger value, then lower index.
template <typename acc_t>
inline bool better(acc_t v, int64_t i, acc_t best, int64_t best_i) {
  const bool v_nan = std::isnan(v), best_nan = std::isnan(best);
  if (v_nan || best_nan) return v_nan && (!best_nan || i < best_i);
  return v > best || (v == best && i < best_i);
}

// Column scale factors 1/||column|| (0 for a zero column, so its cosines are 0), or 1.
// Rows are streamed once with a cache-resident block of column sums (accumulated in double):
// much faster than a strided norm reduction over a row-major matrix.
template <typename acc_t>
at::Tensor inverse_column_norms(const at::Tensor& M, bool normalize) {
  const int64_t batch = M.size(0), d = M.size(1), cols = M.size(2);
  if (!normalize) return at::ones({batch, cols}, M.options());
  at::Tensor inv = at::empty({batch, cols}, M.options());
  constexpr int64_t kCols = 256;
  const int64_t chunks = (cols + kCols - 1) / kCols;
  const int64_t s0 = M.stride(0), s1 = M.stride(1), s2 = M.stride(2);
  const acc_t* data = M.const_data_ptr<acc_t>();
  acc_t* out = inv.data_ptr<acc_t>();
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    double sums[kCols];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c0 = (task % chunks) * kCols;
      const int64_t cc = std::min(kCols, cols - c0);
      std::fill(sums, sums + cc, 0.0);
      const acc_t* base = data + b * s0 + c0 * s2;
      for (int64_t r = 0; r < d; ++r) {
        const acc_t* row = base + r * s1;
        if (s2 == 1) {
          for (int64_t c = 0; c < cc; ++c) sums[c] += double(row[c]) * double(row[c]);
        } else {
          for (int64_t c = 0; c < cc; ++c) sums[c] += double(row[c * s2]) * double(row[c * s2]);
        }
      }
      for (int64_t c = 0; c < cc; ++c) {
        out[b * cols + c0 + c] = sums[c] > 0 ? acc_t(1.0 / std::sqrt(sums[c])) : acc_t(0);
      }
    }
  });
  return inv;
}

template <typename acc_t>
void reduce_tiles(const at::Tensor& Y, const at::Tensor& X, const at::Tensor& inv_y,
                  const at::Tensor& inv_x, bool absolute, at::Tensor& values, at::Tensor& indices) {
  const int64_t batch = Y.size(0), k = Y.size(2), n = X.size(2);
  const int64_t k_tiles = (k + kTileK - 1) / kTileK, n_tiles = (n + kTileN - 1) / kTileN;
  // Split n only as far as needed to give every thread work: partials stay O(k * threads).
  const int64_t groups = batch * k_tiles;
  const int64_t n_chunks = std::min(n_tiles, std::max<int64_t>(1, at::get_num_threads() / groups));
  const int64_t tiles_per_chunk = (n_tiles + n_chunks - 1) / n_chunks;
  const int64_t tile_k = std::min(k, kTileK), tile_n = std::min(n, kTileN);
  at::Tensor part_val = at::empty({batch, k, n_chunks}, Y.options());
  at::Tensor part_idx = at::empty({batch, k, n_chunks}, indices.options());
  acc_t* pv = part_val.data_ptr<acc_t>();
  int64_t* pi = part_idx.data_ptr<int64_t>();
  const acc_t* iy_all = inv_y.const_data_ptr<acc_t>();
  const acc_t* ix_all = inv_x.const_data_ptr<acc_t>();

  at::parallel_for(0, groups * n_chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({tile_k * tile_n}, Y.options());
    std::vector<acc_t> best(tile_k);
    std::vector<int64_t> best_i(tile_k);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (k_tiles * n_chunks);
      const int64_t kt = (task / n_chunks) % k_tiles, chunk = task % n_chunks;
      const int64_t k0 = kt * kTileK, kc = std::min(kTileK, k - k0);
      const int64_t nt_end = std::min(n_tiles, (chunk + 1) * tiles_per_chunk);
      const acc_t* iy = iy_all + b * k + k0;
      for (int64_t nt = chunk * tiles_per_chunk; nt < nt_end; ++nt) {
        const int64_t n0 = nt * kTileN, nc = std::min(kTileN, n - n0);
        at::Tensor dots = buffer.narrow(0, 0, kc * nc).view({kc, nc});
        at::mm_out(dots, Y[b].narrow(1, k0, kc).t(), X[b].narrow(1, n0, nc));
        const acc_t* d = dots.const_data_ptr<acc_t>();
        const acc_t* ix = ix_all + b * n + n0;
        for (int64_t j = 0; j < kc; ++j) {
          const acc_t* row = d + j * nc;
          auto cosine = [&](int64_t i) {
            const acc_t c = row[i] * iy[j] * ix[i];
            return absolute ? std::abs(c) : c;
          };
          acc_t tile_best = cosine(0);
          int64_t tile_best_i = 0;
          // Strict '>' keeps the lowest index on ties; the first NaN is final.
          for (int64_t i = 1; i < nc && !std::isnan(tile_best); ++i) {
            const acc_t c = cosine(i);
            if (!(c <= tile_best)) {
              tile_best = c;
              tile_best_i = i;
            }
          }
          if (nt == chunk * tiles_per_chunk || better(tile_best, n0 + tile_best_i, best[j], best_i[j])) {
            best[j] = tile_best;
            best_i[j] = n0 + tile_best_i;
          }
        }
      }
      for (int64_t j = 0; j < kc; ++j) {
        const int64_t slot = (b * k + k0 + j) * n_chunks + chunk;
        pv[slot] = best[j];
        pi[slot] = best_i[j];
      }
    }
  });

  acc_t* out_v = values.data_ptr<acc_t>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, batch * k, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t v = pv[row * n_chunks];
      int64_t i = pi[row * n_chunks];
      for (int64_t c = 1; c < n_chunks; ++c) {
        if (better(pv[row * n_chunks + c], pi[row * n_chunks + c], v, i)) {
          v = pv[row * n_chunks + c];
          i = pi[row * n_chunks + c];
        }
      }
      out_v[row] = v;
      out_i[row] = i;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_cosine_cpu(const at::Tensor& Y_in, const at::Tensor& X_in,
                                                  bool absolute, bool normalize) {
  const MaxCosineProblem p = prepare_max_cosine(Y_in, X_in);
  const at::ScalarType acc = max_cosine_acc_type(Y_in.scalar_type());
  at::Tensor indices = at::empty(p.out_shape, Y_in.options().dtype(at::kLong));
  if (p.batch == 0 || p.k == 0) {
    return {at::empty(p.out_shape, Y_in.options()), indices};
  }
  // float16/bfloat16 are widened once; float32/float64 are used in place, strides and all.
  const at::Tensor Y = p.Y.to(acc), X = p.X.to(acc);
  at::Tensor values = at::empty({p.batch, p.k}, Y.options());
  at::Tensor idx = indices.view({p.batch, p.k});
  AT_DISPATCH_FLOATING_TYPES(acc, "max_cosine_cpu", [&] {
    reduce_tiles<scalar_t>(Y, X, inverse_column_norms<scalar_t>(Y, normalize),
                           inverse_column_norms<scalar_t>(X, normalize), absolute, values, idx);
  });
  return {values.view(p.out_shape).to(Y_in.scalar_type()), indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(intruder_ext, CPU, m) { m.impl("max_cosine", &max_cosine_cpu); }

}  // namespace intruder_ext
