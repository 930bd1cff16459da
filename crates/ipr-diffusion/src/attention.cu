// CUDA twins of attention.rs's attention without a gradient (sampling):
// - softmax_scaled: `softmax(scale * s)` over each row of attention scores, read in their storage
//   type and written back in it, computed in f32 -- one kernel where the tensor ops took five passes
//   over the scores (scale, upcast, softmax, downcast) and an f32 copy. One block per row; the row
//   is read three times (max, sum, write), from cache after the first.
// - softmax_grad: the softmax's backward in the blockwise attention's recomputing backward.
// - flash_fwd: the whole `softmax(scale * q k^T) v` for bf16/f16 without writing the scores
//   (FlashAttention's online softmax, Dao et al. 2022): a block takes 16 * WARPS query rows and
//   walks the keys 32 at a time; the products on tensor cores (WMMA 16x16x16, f32 accumulators),
//   the softmax statistics and the output accumulator in f32 in shared memory, the probabilities
//   rounded to the input type for the P V product (as the tensor-op path rounds them).
#include "cuda/common.cuh"
#include <mma.h>

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

// The softmax's backward in the blockwise attention's backward: `ds = p * (dp - delta)` for each
// row's probabilities p, their gradient dp and the row's `delta = rowsum(dO * O)` (f32), in f32,
// written in the storage type: one pass where the tensor ops took five and two f32 copies.
template <typename T>
__device__ void softmax_grad(const T* p, const T* dp, const float* delta, T* ds, long long rows, long long cols) {
  const long long total = rows * cols;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x)
    ds[k] = from_f32<T>(to_f32(p[k]) * (to_f32(dp[k]) - delta[k / cols]));
}

#define SOFTMAX_KERNELS(T, SUFFIX)                                                                   \
  extern "C" __global__ void softmax_scaled_##SUFFIX(const T* x, T* y, long long cols, float scale) { \
    softmax_scaled<T>(x, y, cols, scale);                                                            \
  }                                                                                                  \
  extern "C" __global__ void softmax_grad_##SUFFIX(const T* p, const T* dp, const float* delta, T* ds, \
                                                   long long rows, long long cols) {                  \
    softmax_grad<T>(p, dp, delta, ds, rows, cols);                                                   \
  }

SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(__nv_bfloat16, bf16)
SOFTMAX_KERNELS(__half, f16)

namespace wmma = nvcuda::wmma;

// q `(BH, Lq, dh)`, k and v `(BH, Lk, dh)`, out `(BH, Lq, dh)`, contiguous; dh <= D (D a multiple
// of 16: the head dimension padded with zeros, which leaves q k^T unchanged and only fills output
// columns that are not written).
template <typename T, int D, int WARPS>
__device__ void flash_fwd(const T* q, const T* k, const T* v, T* out, int lq, int lk, int dh, float scale) {
  constexpr int BQ = 16 * WARPS, BK = 32;
  __shared__ __align__(32) T qs[BQ * D];
  __shared__ __align__(32) T ks[BK * D];
  __shared__ __align__(32) T vs[BK * D];
  __shared__ __align__(32) float ss[WARPS * 16 * BK];
  __shared__ __align__(32) T ps[WARPS * 16 * BK];
  __shared__ __align__(32) float os[WARPS * 16 * D];
  __shared__ float m_row[BQ], l_row[BQ];

  const long long bh = blockIdx.y;
  const int q0 = blockIdx.x * BQ, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* qb = q + bh * lq * (long long)dh;
  const T* kb = k + bh * lk * (long long)dh;
  const T* vb = v + bh * lk * (long long)dh;
  const T zero = from_f32<T>(0.f);

  for (int i = threadIdx.x; i < BQ * D; i += blockDim.x) {
    const int r = i / D, c = i % D;
    qs[i] = (q0 + r < lq && c < dh) ? qb[(long long)(q0 + r) * dh + c] : zero;
  }
  for (int i = threadIdx.x; i < WARPS * 16 * D; i += blockDim.x) os[i] = 0.f;
  for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
    m_row[i] = -INFINITY;
    l_row[i] = 0.f;
  }

  float* s_w = ss + warp * 16 * BK;
  T* p_w = ps + warp * 16 * BK;
  float* o_w = os + warp * 16 * D;
  const T* q_w = qs + warp * 16 * D;
  // Lane pairs share a row: lane / 2 is the row, lane % 2 the half of the 32 key columns.
  const int r = lane >> 1, half = lane & 1, row = warp * 16 + r;

  for (int k0 = 0; k0 < lk; k0 += BK) {
    __syncthreads();  // the previous tile's ks / vs are no longer read (and the first loads are done)
    for (int i = threadIdx.x; i < BK * D; i += blockDim.x) {
      const int kr = i / D, c = i % D;
      const bool in = k0 + kr < lk && c < dh;
      ks[i] = in ? kb[(long long)(k0 + kr) * dh + c] : zero;
      vs[i] = in ? vb[(long long)(k0 + kr) * dh + c] : zero;
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows and the tile's 32 keys.
    for (int j = 0; j < BK / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, q_w + kk * 16, D);
        wmma::load_matrix_sync(b, ks + j * 16 * D + kk * 16, D);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(s_w + j * 16, acc, BK, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of the row's 32 scores (keys past lk excluded).
    float mx = -INFINITY;
    for (int c = half * 16; c < half * 16 + 16; ++c)
      if (k0 + c < lk) mx = fmaxf(mx, scale * s_w[r * BK + c]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_old = m_row[row];
    const float m_new = fmaxf(m_old, mx);  // finite: every tile has at least one key
    float sum = 0.f;
    for (int c = half * 16; c < half * 16 + 16; ++c) {
      const float p = k0 + c < lk ? expf(scale * s_w[r * BK + c] - m_new) : 0.f;
      p_w[r * BK + c] = from_f32<T>(p);
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float alpha = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
    for (int c = half * (D / 2); c < (half + 1) * (D / 2); ++c) o_w[r * D + c] *= alpha;
    __syncwarp();
    if (half == 0) {
      l_row[row] = l_row[row] * alpha + sum;
      m_row[row] = m_new;
    }

    // O += P V.
    for (int dj = 0; dj < D / 16; ++dj) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
      wmma::load_matrix_sync(o, o_w + dj * 16, D, wmma::mem_row_major);
      for (int kk = 0; kk < BK / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, p_w + kk * 16, BK);
        wmma::load_matrix_sync(b, vs + kk * 16 * D + dj * 16, D);
        wmma::mma_sync(o, a, b, o);
      }
      wmma::store_matrix_sync(o_w + dj * 16, o, D, wmma::mem_row_major);
    }
    __syncwarp();
  }

  __syncthreads();
  T* ob = out + bh * lq * (long long)dh;
  for (int i = threadIdx.x; i < BQ * dh; i += blockDim.x) {
    const int rr = i / dh, c = i % dh;
    if (q0 + rr < lq) ob[(long long)(q0 + rr) * dh + c] = from_f32<T>(os[rr * D + c] / l_row[rr]);
  }
}

// One kernel per (type, padded head dimension); WARPS keeps the shared memory under 48 KiB.
#define FLASH_KERNEL(T, SUFFIX, D, WARPS)                                                              \
  extern "C" __global__ void __launch_bounds__(32 * WARPS) flash_fwd_d##D##_##SUFFIX(                 \
      const T* q, const T* k, const T* v, T* out, int lq, int lk, int dh, float scale) {            \
    flash_fwd<T, D, WARPS>(q, k, v, out, lq, lk, dh, scale);                                         \
  }
#define FLASH_KERNELS(T, SUFFIX)     \
  FLASH_KERNEL(T, SUFFIX, 16, 4)     \
  FLASH_KERNEL(T, SUFFIX, 32, 4)     \
  FLASH_KERNEL(T, SUFFIX, 48, 4)     \
  FLASH_KERNEL(T, SUFFIX, 64, 4)     \
  FLASH_KERNEL(T, SUFFIX, 80, 2)     \
  FLASH_KERNEL(T, SUFFIX, 96, 2)     \
  FLASH_KERNEL(T, SUFFIX, 128, 2)    \
  FLASH_KERNEL(T, SUFFIX, 160, 1)

FLASH_KERNELS(__nv_bfloat16, bf16)
FLASH_KERNELS(__half, f16)
