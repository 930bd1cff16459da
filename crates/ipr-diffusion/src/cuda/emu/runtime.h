// The CUDA emulator's runtime (`cuda-emu` feature; tests only): what the project's kernels use of
// CUDA C++, for a host C++ compiler, so that the `.cu` files themselves run on the CPU.
//
// A launch runs the blocks one after another; a block's threads are fibers (ucontext) on one OS
// thread, each running until it reaches a barrier (`__syncthreads`, `__syncwarp`, a shuffle) or
// returns, so a kernel runs deterministically and a barrier that not every thread reaches is
// reported as a deadlock. `__shared__` variables are function statics: one copy, seen by every
// thread of the block running. The scheduling order (thread 0 first or last) can be reversed: a
// kernel whose result depends on it reads memory another thread writes without a barrier between.
#pragma once
#include <math.h>  // expf, erff, fmaxf, INFINITY in the global namespace, as in CUDA
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Set by the scheduler before it resumes a thread (one OS thread runs them all).
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace ipr_emu {
// The running thread waits until every thread of its block (`warp_only`: of its warp) arrives.
void barrier(bool warp_only);
// The running thread's slot in its warp's exchange buffer.
float& lane_slot(int lane);
}  // namespace ipr_emu

inline void __syncthreads() { ipr_emu::barrier(false); }
inline void __syncwarp(unsigned = 0xffffffffu) { ipr_emu::barrier(true); }

// Every lane of the warp calls it (the full mask is all the kernels use).
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const int lane = (int)(threadIdx.x & 31);
  ipr_emu::lane_slot(lane) = v;
  __syncwarp();
  const float r = ipr_emu::lane_slot(lane ^ lane_mask);
  __syncwarp();
  return r;
}

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
