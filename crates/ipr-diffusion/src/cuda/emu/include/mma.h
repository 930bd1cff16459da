// The CUDA emulator's WMMA (see ../runtime.h): 16x16x16 tiles. A fragment is warp-wide on a GPU,
// its elements spread over the lanes in an unspecified order; here every lane holds the whole
// tile (as f32, exact for bf16/f16), which gives the same results for kernels that only load,
// multiply and store fragments (the project's kernels never index one). The operations are
// warp-collective: a load ends with a warp barrier, so that no lane stores over a tile before
// every lane has read it (the read-modify-write of an accumulator kept in shared memory); a store
// writes each lane's share only.
#pragma once
#include "cuda/emu/runtime.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include <type_traits>

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has 16x16x16 tiles only");
  float x[256];  // the tile, row-major: [row * 16 + col]
};

namespace detail {
inline float f32(float v) { return v; }
inline float f32(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float f32(__half v) { return __half2float(v); }
// Element (r, c) of a tile stored with leading dimension ldm.
template <typename T>
inline float at(const T* p, unsigned ldm, int r, int c, bool row_major) {
  return f32(row_major ? p[r * ldm + c] : p[c * ldm + r]);
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = detail::at(p, ldm, r, c, std::is_same<Layout, row_major>::value);
  __syncwarp();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = detail::at(p, ldm, r, c, l == mem_row_major);
  __syncwarp();
}

// Each lane writes its share of the tile (every 32nd element), as on a GPU: a lane that reads the
// tile back needs a warp barrier first, or it sees other lanes' elements unwritten.
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  for (int e = (int)(threadIdx.x & 31); e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (float& e : f.x) e = v;
}

// d = a b + c, summed in f32 over k in order (tensor cores also sum exact products in f32).
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = s;
    }
  for (int i = 0; i < 256; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda
