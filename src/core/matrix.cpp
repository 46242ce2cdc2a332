#include "core/matrix.h"

#include <algorithm>
#include <limits>

#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
#define DSV3_HAVE_F16C 1
#endif

#include "core/error.h"

namespace dsv3 {

namespace {

#if DSV3_HAVE_F16C
// e4m3 -> f16 bit pattern: moving the 7 magnitude bits up by 7 lands exponent and mantissa in the f16
// fields; f16's exponent bias is 8 larger, so the value comes out 2^-8 too small (subnormals included),
// which the caller folds into its scale. Codes 0x7f/0xff (NaN) are patched to NaN.
inline __m256 fp8x8_to_f32_times_2pow_minus8(const uint8_t* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i mag = _mm_and_si128(b, _mm_set1_epi16(0x7f));
  const __m128i h = _mm_or_si128(_mm_slli_epi16(mag, 7), _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
  const __m256 v = _mm256_cvtph_ps(h);
  const __m256 nan_mask = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7f))));
  return _mm256_blendv_ps(v, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), nan_mask);
}
#endif

}  // namespace

void Matrix::dequantize_row(int64_t r, float* out) const {
  switch (dtype) {
    case DType::F32: {
      const float* p = reinterpret_cast<const float*>(data) + r * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] = p[c];
      break;
    }
    case DType::BF16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(data) + r * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] = bf16_to_f32(p[c]);
      break;
    }
    case DType::F16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(data) + r * cols;
      int64_t c = 0;
#if DSV3_HAVE_F16C
      for (; c + 8 <= cols; c += 8)
        _mm256_storeu_ps(out + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c))));
#endif
      for (; c < cols; ++c) out[c] = f16_to_f32(p[c]);
      break;
    }
    case DType::F8_E4M3: {
      const uint8_t* p = data + r * cols;
      const float* table = fp8_e4m3_table();
      const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
      const float* scales = scale_inv + (r / block_rows) * scale_cols;
      for (int64_t c0 = 0, b = 0; c0 < cols; c0 += block_cols, ++b) {
        const int64_t c1 = std::min(cols, c0 + block_cols);
        const float s = scales[b];
        int64_t c = c0;
#if DSV3_HAVE_F16C
        const __m256 s256 = _mm256_set1_ps(s * 256.0f);
        for (; c + 8 <= c1; c += 8) _mm256_storeu_ps(out + c, _mm256_mul_ps(fp8x8_to_f32_times_2pow_minus8(p + c), s256));
#endif
        for (; c < c1; ++c) out[c] = table[p[c]] * s;
      }
      break;
    }
    default:
      DSV3_ASSERT(false && "unsupported matrix dtype");
  }
}

size_t Matrix::bytes() const {
  size_t n = static_cast<size_t>(rows * cols) * dtype_size(dtype);
  if (scale_inv)
    n += static_cast<size_t>(((rows + block_rows - 1) / block_rows) * ((cols + block_cols - 1) / block_cols)) * 4;
  return n;
}

}  // namespace dsv3
