// CUDA twins of geglu.rs's CPU kernels: `a * gelu(gate)` for `[a, gate]` the halves of each row of
// `h` `(rows, 2n)` (the exact, erf GELU), and its gradient, elementwise, in f32.
#include "cuda/common.cuh"

#define INV_SQRT2 0.70710678118654752f
#define INV_SQRT_2PI 0.39894228040143268f

template <typename T>
__device__ void geglu_fwd(const T* h, T* y, long long rows, long long n) {
  const long long total = rows * n;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
    const long long r = k / n, j = k - r * n;
    const float a = to_f32(h[r * 2 * n + j]), x = to_f32(h[r * 2 * n + n + j]);
    y[k] = from_f32<T>(a * 0.5f * x * (1.f + erff(x * INV_SQRT2)));
  }
}

// d a = g * gelu(x); d x = g * a * (cdf(x) + x * pdf(x)).
template <typename T>
__device__ void geglu_bwd(const T* h, const T* g, T* dh, long long rows, long long n) {
  const long long total = rows * n;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
    const long long r = k / n, j = k - r * n;
    const float a = to_f32(h[r * 2 * n + j]), x = to_f32(h[r * 2 * n + n + j]), gk = to_f32(g[k]);
    const float cdf = 0.5f * (1.f + erff(x * INV_SQRT2));
    const float pdf = expf(-0.5f * x * x) * INV_SQRT_2PI;
    dh[r * 2 * n + j] = from_f32<T>(gk * x * cdf);
    dh[r * 2 * n + n + j] = from_f32<T>(gk * a * (cdf + x * pdf));
  }
}

#define GEGLU_KERNELS(T, SUFFIX)                                                                        \
  extern "C" __global__ void geglu_fwd_##SUFFIX(const T* h, T* y, long long rows, long long n) {         \
    geglu_fwd<T>(h, y, rows, n);                                                                        \
  }                                                                                                     \
  extern "C" __global__ void geglu_bwd_##SUFFIX(const T* h, const T* g, T* dh, long long rows, long long n) { \
    geglu_bwd<T>(h, g, dh, rows, n);                                                                    \
  }

GEGLU_KERNELS(float, f32)
GEGLU_KERNELS(__nv_bfloat16, bf16)
GEGLU_KERNELS(__half, f16)
