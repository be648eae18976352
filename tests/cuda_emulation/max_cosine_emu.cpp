// The CUDA max_cosine kernel (csrc/cuda/max_cosine_kernel.cuh) built against the CUDA emulation,
// with C entry points for tests/test_max_cosine_emulated.py (ctypes).
#include "cuda_emu.h"  // first: it defines what nvcc would provide to the kernel header
#include "../../csrc/cuda/max_cosine_kernel.cuh"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace intruder_ext::max_cosine_cuda;

// bfloat16 as the kernel uses CUDA's __nv_bfloat16: 16 bits of storage, explicit conversion to
// float and back (round to nearest, ties to even). float16 is the compiler's _Float16.
struct BFloat16 {
  uint16_t bits;
  BFloat16() = default;
  explicit BFloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    bits = std::isnan(f) ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  explicit operator float() const {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};
static_assert(sizeof(BFloat16) == 2 && sizeof(_Float16) == 2, "16-bit storage, as torch's");

// sizes: batch, d, k, n (each >= 1 but d); strides: (batch, d, column) in elements.
// Mirrors the launcher in csrc/cuda/max_cosine_cuda.cu (acc_t: at::opmath_type<scalar_t>);
// returns the number of n-splits used.
template <typename scalar_t, typename acc_t>
int64_t run(const scalar_t* Y, const scalar_t* X, const int64_t* sizes, const int64_t* y_strides,
            const int64_t* x_strides, bool absolute, bool normalize, int64_t target_blocks,
            int64_t max_batch_blocks, unsigned int seed, scalar_t* values, int64_t* indices) {
  const LaunchConfig c = launch_config(sizes[0], sizes[2], sizes[3], target_blocks, max_batch_blocks);
  std::vector<acc_t> partial_values(c.workspace_entries);
  std::vector<int64_t> partial_indices(c.workspace_entries);
  std::vector<unsigned int> counters(c.counters, 0u);
  Params p{};
  p.Y = Y;
  p.X = X;
  p.batch = sizes[0];
  p.d = sizes[1];
  p.k = sizes[2];
  p.n = sizes[3];
  p.y_sb = y_strides[0];
  p.y_sd = y_strides[1];
  p.y_sk = y_strides[2];
  p.x_sb = x_strides[0];
  p.x_sd = x_strides[1];
  p.x_sn = x_strides[2];
  p.absolute = absolute;
  p.normalize = normalize;
  p.tiles_per_split = c.tiles_per_split;
  p.values = values;
  p.indices = indices;
  p.partial_values = partial_values.data();
  p.partial_indices = partial_indices.data();
  p.counters = counters.data();
  const dim3 grid(static_cast<unsigned int>(c.k_tiles), static_cast<unsigned int>(c.splits),
                  static_cast<unsigned int>(c.batch_blocks));
  cuda_emu::launch(grid, dim3(kThreads), seed, max_cosine_kernel<scalar_t, acc_t>, p);
  return c.splits;
}

}  // namespace

// C entry points, one per dtype; the data are passed as untyped pointers (ctypes).
#define MAX_COSINE_EMU_ENTRY(NAME, SCALAR_T, ACC_T)                                                \
  int64_t NAME(const void* Y, const void* X, const int64_t* sizes, const int64_t* y_strides,       \
               const int64_t* x_strides, int absolute, int normalize, int64_t target_blocks,       \
               int64_t max_batch_blocks, unsigned int seed, void* values, int64_t* indices) {      \
    return run<SCALAR_T, ACC_T>(static_cast<const SCALAR_T*>(Y), static_cast<const SCALAR_T*>(X), \
                                sizes, y_strides, x_strides, absolute, normalize, target_blocks,   \
                                max_batch_blocks, seed, static_cast<SCALAR_T*>(values), indices);  \
  }

extern "C" {
MAX_COSINE_EMU_ENTRY(max_cosine_emu_float, float, float)
MAX_COSINE_EMU_ENTRY(max_cosine_emu_double, double, double)
// float16 and bfloat16 accumulate in float32, as at::opmath_type makes the real launcher do.
MAX_COSINE_EMU_ENTRY(max_cosine_emu_half, _Float16, float)
MAX_COSINE_EMU_ENTRY(max_cosine_emu_bfloat16, BFloat16, float)
}  // extern "C"
