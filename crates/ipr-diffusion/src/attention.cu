// CUDA twin of attention.rs's score softmax: `softmax(scale * s)` over each row of attention
// scores, read in their storage type and written back in it, computed in f32 -- one kernel where
// the tensor ops took five passes over the scores (scale, upcast, softmax, downcast) and an f32
// copy. One block per row; the row is read three times (max, sum, write), from cache after the first.
#include "cuda/common.cuh"

template <typename T>
__device__ void softmax_scaled(const T* x, T* y, long long cols, float scale) {
  const long long row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  float m = -INFINITY;
  for (long long i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, scale * to_f32(xr[i]));
  m = block_max(m);
  float acc = 0.f;
  for (long long i = threadIdx.x; i < cols; i += blockDim.x) acc += expf(scale * to_f32(xr[i]) - m);
  const float inv = 1.f / block_sum(acc);
  for (long long i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = from_f32<T>(expf(scale * to_f32(xr[i]) - m) * inv);
}

#define SOFTMAX_KERNELS(T, SUFFIX)                                                                   \
  extern "C" __global__ void softmax_scaled_##SUFFIX(const T* x, T* y, long long cols, float scale) { \
    softmax_scaled<T>(x, y, cols, scale);                                                            \
  }

SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(__nv_bfloat16, bf16)
SOFTMAX_KERNELS(__half, f16)
