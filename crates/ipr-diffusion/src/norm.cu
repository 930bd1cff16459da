// CUDA twins of norm.rs's CPU kernels: group normalisation (layer normalisation as one group of
// one-pixel channels) with its affine part and an optional SiLU, forward and input gradient.
// `x` is `(rows, cg * s)`: one block per row (an (image, group) pair, or a token for layer norm),
// the channel of element i being `(row % groups) * cg + i / s`. Statistics in f32, two passes
// (the mean, then the centred squares) as the CPU kernel computes them (in f64 there); the input
// gradient recomputes them rather than keeping them from the forward.
#include "cuda/common.cuh"

template <typename T>
__device__ __forceinline__ void row_stats(const T* xr, long long len, float eps, float& mean, float& inv) {
  float acc = 0.f;
  for (long long i = threadIdx.x; i < len; i += blockDim.x) acc += to_f32(xr[i]);
  mean = block_sum(acc) / (float)len;
  acc = 0.f;
  for (long long i = threadIdx.x; i < len; i += blockDim.x) {
    const float d = to_f32(xr[i]) - mean;
    acc += d * d;
  }
  inv = rsqrtf(block_sum(acc) / (float)len + eps);
}

template <typename T>
__device__ void norm_fwd(const T* x, const T* w, const T* b, T* y, int groups, int cg, int s, float eps, int silu) {
  const long long len = (long long)cg * s, row = blockIdx.x;
  const T* xr = x + row * len;
  T* yr = y + row * len;
  const int c0 = (int)(row % groups) * cg;
  float mean, inv;
  row_stats(xr, len, eps, mean, inv);
  for (long long i = threadIdx.x; i < len; i += blockDim.x) {
    const int ch = c0 + (int)(i / s);
    float u = (to_f32(xr[i]) - mean) * inv * to_f32(w[ch]) + to_f32(b[ch]);
    if (silu) u = u / (1.f + expf(-u));
    yr[i] = from_f32<T>(u);
  }
}

// dx = inv * (d - mean(d) - n * mean(d * n)), with n the normalised input and
// d = dy * silu'(u) * w (u = n * w + b; without SiLU d = dy * w).
template <typename T>
__device__ __forceinline__ float norm_term(const T* xr, const T* gr, const T* w, const T* b, long long i, int ch, float mean,
                                           float inv, int silu, float& n) {
  n = (to_f32(xr[i]) - mean) * inv;
  const float wc = to_f32(w[ch]);
  float du = to_f32(gr[i]);
  if (silu) {
    const float u = n * wc + to_f32(b[ch]);
    const float sg = 1.f / (1.f + expf(-u));
    du *= sg * (1.f + u * (1.f - sg));
  }
  return du * wc;
}

template <typename T>
__device__ void norm_bwd_x(const T* x, const T* dy, const T* w, const T* b, T* dx, int groups, int cg, int s, float eps,
                           int silu) {
  const long long len = (long long)cg * s, row = blockIdx.x;
  const T* xr = x + row * len;
  const T* gr = dy + row * len;
  T* out = dx + row * len;
  const int c0 = (int)(row % groups) * cg;
  float mean, inv;
  row_stats(xr, len, eps, mean, inv);
  float s1 = 0.f, s2 = 0.f;
  for (long long i = threadIdx.x; i < len; i += blockDim.x) {
    float n;
    const float d = norm_term(xr, gr, w, b, i, c0 + (int)(i / s), mean, inv, silu, n);
    s1 += d;
    s2 += d * n;
  }
  const float m1 = block_sum(s1) / (float)len, m2 = block_sum(s2) / (float)len;
  for (long long i = threadIdx.x; i < len; i += blockDim.x) {
    float n;
    const float d = norm_term(xr, gr, w, b, i, c0 + (int)(i / s), mean, inv, silu, n);
    out[i] = from_f32<T>((d - m1 - n * m2) * inv);
  }
}

#define NORM_KERNELS(T, SUFFIX)                                                                                  \
  extern "C" __global__ void norm_fwd_##SUFFIX(const T* x, const T* w, const T* b, T* y, int groups, int cg,    \
                                               int s, float eps, int silu) {                                    \
    norm_fwd<T>(x, w, b, y, groups, cg, s, eps, silu);                                                           \
  }                                                                                                              \
  extern "C" __global__ void norm_bwd_x_##SUFFIX(const T* x, const T* dy, const T* w, const T* b, T* dx,        \
                                                 int groups, int cg, int s, float eps, int silu) {              \
    norm_bwd_x<T>(x, dy, w, b, dx, groups, cg, s, eps, silu);                                                    \
  }

NORM_KERNELS(float, f32)
NORM_KERNELS(__nv_bfloat16, bf16)
NORM_KERNELS(__half, f16)
