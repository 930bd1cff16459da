// The CUDA emulator's bf16 (see ../runtime.h): the 16 high bits of an f32, rounded to nearest even.
// A scalar type (not a struct), so that arrays of it are bounds-checked like arrays of numbers.
#pragma once
#include <cstdint>
#include <cstring>

enum class __nv_bfloat16 : uint16_t {};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = (uint32_t)static_cast<uint16_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<__nv_bfloat16>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1);
  return static_cast<__nv_bfloat16>(u >> 16);
}
