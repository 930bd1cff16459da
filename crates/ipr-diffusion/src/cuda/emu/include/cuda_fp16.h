// The CUDA emulator's f16 (see ../runtime.h): the compiler's IEEE binary16, rounded to nearest even.
#pragma once

struct __half {
  _Float16 v;
};

inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half(float f) { return {(_Float16)f}; }
