// Storage dtypes of checkpoint tensors and their conversion to float. Weights are never converted as a
// whole; kernels call these per element (or per row) while computing.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace dsv3 {

// Every dtype the safetensors format names, so that any valid file can be checked; the engine computes
// with F32, F16, BF16 and F8_E4M3 weights.
enum class DType : uint8_t { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL, Unknown };

// Bytes per element; 0 for Unknown.
size_t dtype_size(DType t);
// Safetensors spelling ("BF16", "F8_E4M3", ...).
const char* dtype_name(DType t);
DType dtype_from_name(const std::string& s);  // Unknown when not recognized

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even, as torch does when casting float to bfloat16; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// FP8 E4M3 "fn" variant (used by DeepSeek-V3): exponent bias 7, no infinities, 0x7f/0xff are NaN,
// largest finite value 448. Decoded through a 256-entry table built once.
float fp8_e4m3_to_f32(uint8_t v);
const float* fp8_e4m3_table();  // table[256]

// Encoding, for writers (tests, generators, the trainer): round to nearest even. f16 overflows to inf;
// e4m3 saturates at +-448 (it has no infinity) and maps NaN to 0x7f.
uint16_t f32_to_f16(float f);
uint8_t f32_to_fp8_e4m3(float f);

}  // namespace dsv3
