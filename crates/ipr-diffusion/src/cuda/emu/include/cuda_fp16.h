// The CUDA emulator's f16 (see ../runtime.h): IEEE binary16 (the compiler's _Float16 does the
// rounding, to nearest even). A scalar type (not a struct), as bf16.
#pragma once
#include <cstdint>
#include <cstring>

enum class __half : uint16_t {};

inline float __half2float(__half h) {
  const uint16_t bits = static_cast<uint16_t>(h);
  _Float16 f;
  std::memcpy(&f, &bits, 2);
  return (float)f;
}

inline __half __float2half(float f) {
  const _Float16 h = (_Float16)f;
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return static_cast<__half>(bits);
}
