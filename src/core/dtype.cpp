#include "core/dtype.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace dsv3 {

namespace {

struct DTypeInfo {
  DType type;
  const char* name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8},     {DType::F32, "F32", 4},         {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2},   {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
    {DType::I64, "I64", 8},     {DType::I32, "I32", 4},         {DType::I16, "I16", 2},
    {DType::I8, "I8", 1},       {DType::U64, "U64", 8},         {DType::U32, "U32", 4},
    {DType::U16, "U16", 2},     {DType::U8, "U8", 1},           {DType::BOOL, "BOOL", 1},
};

}  // namespace

size_t dtype_size(DType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d.size;
  return 0;
}

const char* dtype_name(DType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d.name;
  return "unknown";
}

DType dtype_from_name(const std::string& s) {
  for (const auto& d : kDTypes)
    if (s == d.name) return d.type;
  return DType::Unknown;
}

namespace {

float decode_e4m3(uint8_t v) {
  const float sign = (v & 0x80) ? -1.0f : 1.0f;
  const int exp = (v >> 3) & 0xf;
  const int man = v & 0x7;
  if (exp == 0xf && man == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) return sign * std::ldexp(static_cast<float>(man) / 8.0f, -6);  // subnormal
  return sign * std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
}

struct E4M3Table {
  float v[256];
  E4M3Table() {
    for (int i = 0; i < 256; ++i) v[i] = decode_e4m3(static_cast<uint8_t>(i));
  }
};

}  // namespace

const float* fp8_e4m3_table() {
  static const E4M3Table table;
  return table.v;
}

float fp8_e4m3_to_f32(uint8_t v) { return fp8_e4m3_table()[v]; }

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t exp = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
  uint32_t man = u & 0x7fffffu;
  if (((u >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (man ? 0x200u : 0));
  if (exp >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow to infinity
  if (exp <= 0) {                                                  // subnormal or zero
    if (exp < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t half = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t h = sign | static_cast<uint32_t>(exp) << 10 | man >> 13;
  const uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;  // may carry into the exponent: still correct
  return static_cast<uint16_t>(h);
}

uint8_t f32_to_fp8_e4m3(float f) {
  // Round to nearest even, saturating at 448 (the fn variant has no infinity). NaN maps to 0x7f.
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  const float a = std::min(std::fabs(f), 448.0f);
  if (a < 0.015625f) {  // below the smallest normal 2^-6: multiples of 2^-9
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f)));
  }
  int ex = 0;
  const float fr = std::frexp(a, &ex);  // a = fr * 2^ex, fr in [0.5, 1)
  int e = ex - 1 + 7;
  int m = static_cast<int>(std::nearbyint((2.0f * fr - 1.0f) * 8.0f));
  if (m == 8) m = 0, ++e;
  const int code = std::min(e << 3 | m, 0x7e);
  return static_cast<uint8_t>(sign | code);
}

}  // namespace dsv3
