// The fused max_cosine CUDA kernel: column norms, tiled GEMM, (abs-)max/arg-max epilogue and the
// combine across blocks, in one launch.
//
// Pure device code plus a host launch-config helper, with no torch includes: besides nvcc, a plain
// C++20 compiler builds it against tests/cuda_emulation/cuda_emu.h, so the test suite runs this
// very source on a machine without a GPU.
//
// Work split. A block owns kTileK columns of Y (one k-tile) of one batch entry and a contiguous
// range of n-tiles (kTileN columns of X each). For each n-tile it walks d in kTileD-row chunks:
// both tiles are staged in shared memory, the column norms are summed from those same tiles and
// each thread accumulates a kRowsPerThread x kColsPerThread register tile of dot products. The
// epilogue turns dots into cosines, reduces each Y column's tile row to (max, arg-max) and folds
// it into the block's running best. n is split across blocks (grid.y) so that small k still
// fills the GPU.
//
// Combine across blocks. Each block writes its per-row best to a workspace; the last block of a
// (batch, k-tile) to finish -- detected with __threadfence + an atomicAdd on a counter -- reduces
// the partials. This works alike for every accumulation type (a packed 64-bit atomicMax would be
// exact only for float) and is deterministic: the candidate order (NaN first, then larger value,
// then lower index) is a strict total order, so the maximum does not depend on which block
// finishes when.
#pragma once

#include <cmath>
#include <cstdint>

namespace intruder_ext {
namespace max_cosine_cuda {

constexpr int kTileK = 32;   // Y columns per block
constexpr int kTileN = 64;   // X columns per n-tile
constexpr int kTileD = 16;   // rows of d per shared-memory stage
constexpr int kThreads = 256;
constexpr int kThreadsK = 16;  // threads along k; kThreads / kThreadsK = 16 along n
constexpr int kThreadsN = kThreads / kThreadsK;
constexpr int kRowsPerThread = kTileK / kThreadsK;  // 2
constexpr int kColsPerThread = kTileN / kThreadsN;  // 4
constexpr int kCombineLanes = kThreads / kTileK;    // threads per row in the final combine
// grid.y and grid.z hold at most 65535 blocks (grid.x 2^31 - 1: k-tiles always fit).
constexpr int64_t kMaxGridYZ = 65535;

struct Params {
  const void* Y;  // scalar_t
  const void* X;
  int64_t batch, d, k, n;
  int64_t y_sb, y_sd, y_sk;  // strides of Y (batch, d, k); batch stride 0 when broadcast
  int64_t x_sb, x_sd, x_sn;  // strides of X (batch, d, n)
  bool absolute, normalize;
  int64_t tiles_per_split;  // n-tiles per block
  // Outputs, contiguous (batch, k).
  void* values;  // scalar_t
  int64_t* indices;
  // Cross-block workspace when n is split (grid.y > 1): partial bests (batch, k, splits) and one
  // zero-initialized arrival counter per (batch, k-tile).
  void* partial_values;  // acc_t
  int64_t* partial_indices;
  unsigned int* counters;
};

struct LaunchConfig {
  int64_t k_tiles, n_tiles, splits, tiles_per_split, batch_blocks;
  int64_t workspace_entries;  // batch * k * splits partials, 0 when splits == 1
  int64_t counters;           // batch * k_tiles, 0 when splits == 1
};

// Grid for a (batch, k, n) problem that aims at `target_blocks` resident blocks: k-tiles on x,
// n-splits on y, batch on z (looped in the kernel beyond the grid limit). n is split only as far
// as the k-tiles and batch leave the GPU idle. `max_batch_blocks` lets tests exercise the loop.
// Needs batch, k, n >= 1.
inline LaunchConfig launch_config(int64_t batch, int64_t k, int64_t n, int64_t target_blocks,
                                  int64_t max_batch_blocks = kMaxGridYZ) {
  LaunchConfig c{};
  c.k_tiles = (k + kTileK - 1) / kTileK;
  c.n_tiles = (n + kTileN - 1) / kTileN;
  c.batch_blocks = batch < max_batch_blocks ? batch : max_batch_blocks;
  const int64_t others = c.k_tiles * c.batch_blocks;
  int64_t splits = (target_blocks + others - 1) / others;
  if (splits > c.n_tiles) splits = c.n_tiles;
  if (splits > kMaxGridYZ) splits = kMaxGridYZ;
  if (splits < 1) splits = 1;
  c.tiles_per_split = (c.n_tiles + splits - 1) / splits;
  // No empty blocks: every split gets at least one n-tile.
  c.splits = (c.n_tiles + c.tiles_per_split - 1) / c.tiles_per_split;
  c.workspace_entries = c.splits > 1 ? batch * k * c.splits : 0;
  c.counters = c.splits > 1 ? batch * c.k_tiles : 0;
  return c;
}

// True when (v, i) ranks above (best, best_i): NaN above everything (it propagates), then the
// larger value, then the lower index. `x != x` tests NaN alike in device code and plain C++.
template <typename acc_t>
__device__ __forceinline__ bool better(acc_t v, int64_t i, acc_t best, int64_t best_i) {
  const bool v_nan = v != v, best_nan = best != best;
  if (v_nan || best_nan) return v_nan && (!best_nan || i < best_i);
  return v > best || (v == best && i < best_i);
}

// (-inf, kNoIndex) ranks below every candidate: the start of a running maximum.
constexpr int64_t kNoIndex = INT64_MAX;

// Stages rows [0, kTileD) x columns [0, tile_cols) of an operand into a shared tile (ld elements
// per row), zero outside rows_left x cols_left so that padding adds nothing to dots or norms.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ base, int64_t s_row,
                                          int64_t s_col, int64_t rows_left, int64_t cols_left,
                                          int tile_cols, acc_t* tile, int ld) {
  // Consecutive threads walk the operand's contiguous direction, so global loads coalesce for
  // column-major and row-major storage alike.
  const bool cols_fastest = s_col <= s_row;
  const int count = kTileD * tile_cols;
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const int r = cols_fastest ? e / tile_cols : e % kTileD;
    const int c = cols_fastest ? e % tile_cols : e / kTileD;
    acc_t v = acc_t(0);
    if (r < rows_left && c < cols_left) v = static_cast<acc_t>(base[r * s_row + c * s_col]);
    tile[r * ld + c] = v;
  }
}

// 1/||column|| from its sum of squares; 0 for a zero (or NaN) column so its cosines are 0 (or
// NaN through the NaN dot), never 0/0. Same rule as the CPU kernel.
template <typename acc_t>
__device__ __forceinline__ acc_t inverse_norm(acc_t sum_sq) {
  return sum_sq > acc_t(0) ? acc_t(1) / sqrt(sum_sq) : acc_t(0);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) max_cosine_kernel(Params p) {
  constexpr int ld_y = kTileK + 1;  // +1 keeps the row-fastest stores off a single bank
  constexpr int ld_x = kTileN + 1;
  __shared__ acc_t y_tile[kTileD * ld_y];
  __shared__ acc_t x_tile[kTileD * ld_x];
  __shared__ acc_t inv_y[kTileK];
  __shared__ acc_t inv_x[kTileN];
  // Per-row candidates of the tile epilogue, reused by the final combine.
  static_assert(kCombineLanes <= kThreadsN, "the combine reuses the epilogue's buffers");
  __shared__ acc_t red_value[kTileK * kThreadsN];
  __shared__ int64_t red_index[kTileK * kThreadsN];
  __shared__ bool is_last;

  const int tid = threadIdx.x;
  // Thread (tk, tn) owns rows tk + kThreadsK * i and columns tn + kThreadsN * j of the tile:
  // interleaved, so a warp reads consecutive shared-memory words (no bank conflicts).
  const int tk = tid / kThreadsN, tn = tid % kThreadsN;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTileK;
  const int64_t rows_k = p.k - k0 < kTileK ? p.k - k0 : kTileK;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t n_tiles = (p.n + kTileN - 1) / kTileN;
  const int64_t t_begin = split * p.tiles_per_split;
  const int64_t t_end =
      t_begin + p.tiles_per_split < n_tiles ? t_begin + p.tiles_per_split : n_tiles;
  const scalar_t* Y_all = static_cast<const scalar_t*>(p.Y);
  const scalar_t* X_all = static_cast<const scalar_t*>(p.X);
  scalar_t* values = static_cast<scalar_t*>(p.values);
  acc_t* partial_values = static_cast<acc_t*>(p.partial_values);

  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const scalar_t* Y = Y_all + b * p.y_sb + k0 * p.y_sk;
    // Running best of row `tid` (threads below kTileK) over this block's n-tiles.
    acc_t best = -INFINITY;
    int64_t best_i = kNoIndex;
    acc_t y_sum_sq = acc_t(0), x_sum_sq = acc_t(0);

    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n0 = t * kTileN;
      const int64_t cols_n = p.n - n0 < kTileN ? p.n - n0 : kTileN;
      const scalar_t* X = X_all + b * p.x_sb + n0 * p.x_sn;
      // Y's norms are the same for every n-tile: sum them during the first one only.
      const bool y_norms = p.normalize && t == t_begin;
      acc_t dot[kRowsPerThread][kColsPerThread] = {};
      x_sum_sq = acc_t(0);

      for (int64_t r0 = 0; r0 < p.d; r0 += kTileD) {
        const int64_t rows_d = p.d - r0;
        load_tile(Y + r0 * p.y_sd, p.y_sd, p.y_sk, rows_d, rows_k, kTileK, y_tile, ld_y);
        load_tile(X + r0 * p.x_sd, p.x_sd, p.x_sn, rows_d, cols_n, kTileN, x_tile, ld_x);
        __syncthreads();
        // Norms from the tiles already in shared memory: warp 0 sums Y's columns, warps 1-2
        // X's, while the GEMM below keeps every warp busy.
        if (p.normalize) {
          if (tid < kTileK) {
            if (y_norms)
              for (int r = 0; r < kTileD; ++r) y_sum_sq += y_tile[r * ld_y + tid] * y_tile[r * ld_y + tid];
          } else if (tid < kTileK + kTileN) {
            const int c = tid - kTileK;
            for (int r = 0; r < kTileD; ++r) x_sum_sq += x_tile[r * ld_x + c] * x_tile[r * ld_x + c];
          }
        }
#pragma unroll
        for (int r = 0; r < kTileD; ++r) {
          acc_t a[kRowsPerThread], x[kColsPerThread];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) a[i] = y_tile[r * ld_y + tk + kThreadsK * i];
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) x[j] = x_tile[r * ld_x + tn + kThreadsN * j];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
            for (int j = 0; j < kColsPerThread; ++j) dot[i][j] += a[i] * x[j];
        }
        __syncthreads();
      }

      if (p.normalize) {
        if (tid < kTileK) {
          if (y_norms) inv_y[tid] = inverse_norm(y_sum_sq);
        } else if (tid < kTileK + kTileN) {
          inv_x[tid - kTileK] = inverse_norm(x_sum_sq);
        }
        __syncthreads();
      }

      // Epilogue: cosines of this thread's tile, reduced to (max, arg-max) per row.
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int row = tk + kThreadsK * i;
        acc_t row_best = -INFINITY;
        int64_t row_best_i = kNoIndex;
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) {
          const int col = tn + kThreadsN * j;
          if (col >= cols_n) continue;
          acc_t c = dot[i][j];
          if (p.normalize) c = c * inv_y[row] * inv_x[col];
          if (p.absolute) c = fabs(c);
          if (better(c, n0 + col, row_best, row_best_i)) {
            row_best = c;
            row_best_i = n0 + col;
          }
        }
        red_value[row * kThreadsN + tn] = row_best;
        red_index[row * kThreadsN + tn] = row_best_i;
      }
      __syncthreads();
      if (tid < kTileK) {
        for (int j = 0; j < kThreadsN; ++j) {
          const acc_t v = red_value[tid * kThreadsN + j];
          const int64_t i = red_index[tid * kThreadsN + j];
          if (better(v, i, best, best_i)) {
            best = v;
            best_i = i;
          }
        }
      }
      __syncthreads();  // red_* are rewritten by the next tile's epilogue
    }

    const int64_t row = k0 + tid;  // global Y column owned by thread tid < kTileK
    if (splits == 1) {
      if (tid < rows_k) {
        values[b * p.k + row] = static_cast<scalar_t>(best);
        p.indices[b * p.k + row] = best_i;
      }
      continue;
    }

    // Publish this block's partials; the last block of the (batch, k-tile) to arrive reduces them.
    if (tid < rows_k) {
      partial_values[(b * p.k + row) * splits + split] = best;
      p.partial_indices[(b * p.k + row) * splits + split] = best_i;
      __threadfence();  // partials visible device-wide before the counter says so
    }
    __syncthreads();
    if (tid == 0) {
      const unsigned int arrived = atomicAdd(&p.counters[b * gridDim.x + blockIdx.x], 1u);
      is_last = arrived == splits - 1;
      if (is_last) __threadfence();  // acquire side: see every other block's partials
    }
    __syncthreads();
    if (!is_last) continue;

    // kCombineLanes threads per row stride over the splits, then one thread per row folds theirs.
    const int lane_row = tid / kCombineLanes, lane = tid % kCombineLanes;
    acc_t lane_best = -INFINITY;
    int64_t lane_best_i = kNoIndex;
    if (lane_row < rows_k) {
      const int64_t base = (b * p.k + k0 + lane_row) * splits;
      for (int64_t s = lane; s < splits; s += kCombineLanes) {
        // volatile: read the other blocks' writes from L2, not a stale L1 line.
        const acc_t v = *static_cast<volatile acc_t*>(partial_values + base + s);
        const int64_t i = *static_cast<volatile int64_t*>(p.partial_indices + base + s);
        if (better(v, i, lane_best, lane_best_i)) {
          lane_best = v;
          lane_best_i = i;
        }
      }
    }
    red_value[tid] = lane_best;
    red_index[tid] = lane_best_i;
    __syncthreads();
    if (tid < rows_k) {
      for (int l = 0; l < kCombineLanes; ++l) {
        const acc_t v = red_value[tid * kCombineLanes + l];
        const int64_t i = red_index[tid * kCombineLanes + l];
        if (better(v, i, best, best_i)) {
          best = v;
          best_i = i;
        }
      }
      values[b * p.k + row] = static_cast<scalar_t>(best);
      p.indices[b * p.k + row] = best_i;
    }
    // The next batch entry's epilogue rewrites red_*: everyone waits until they are read.
    __syncthreads();
  }
}

}  // namespace max_cosine_cuda
}  // namespace intruder_ext
