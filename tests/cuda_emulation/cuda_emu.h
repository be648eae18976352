// A small emulation of the CUDA execution model for g++ -std=c++20, enough to run the project's
// kernels on a machine without a GPU.
//
// - launch(grid, block, kernel, args...) runs the blocks one at a time, in a shuffled (seeded)
//   order so that code relying on block order fails; the threads of a block are real std::threads.
// - threadIdx/blockIdx are thread_local; gridDim/blockDim are globals of the running launch.
// - __shared__ is `static`: with one block alive at a time, a function's statics are exactly that
//   block's shared memory. Like real shared memory it is not reset between blocks.
// - __syncthreads is a std::barrier over the block's threads; atomicAdd goes through
//   std::atomic_ref; __threadfence is a sequentially consistent fence.
// Only what the project's kernels use is here. Not emulated: warps (no shuffles or votes),
// concurrent blocks, dynamic shared memory.
#pragma once

#include <math.h>  // sqrt/fabs overloaded for float in the global namespace, as CUDA has them

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 gridDim;
inline dim3 blockDim;

namespace cuda_emu {
inline std::barrier<>* block_barrier = nullptr;
}

inline void __syncthreads() { cuda_emu::block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

namespace cuda_emu {

// Runs kernel(args...) over grid x block. Blocks run one after another in an order shuffled by
// `seed`; within a block, every thread is a std::thread.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, unsigned int seed, Kernel kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  std::vector<uint3> blocks;
  for (unsigned int z = 0; z < grid.z; ++z)
    for (unsigned int y = 0; y < grid.y; ++y)
      for (unsigned int x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
  std::mt19937 rng(seed);
  std::shuffle(blocks.begin(), blocks.end(), rng);

  const unsigned int threads = block.x * block.y * block.z;
  for (const uint3 b : blocks) {
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t) {
      pool.emplace_back([=] {
        blockIdx = b;
        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        kernel(args...);
      });
    }
    for (std::thread& th : pool) th.join();
    block_barrier = nullptr;
  }
}

}  // namespace cuda_emu
