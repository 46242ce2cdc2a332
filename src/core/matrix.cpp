#include "core/matrix.h"

#include <algorithm>

#include "core/error.h"

namespace dsv3 {

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
      for (int64_t c = 0; c < cols; ++c) out[c] = f16_to_f32(p[c]);
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
        for (int64_t c = c0; c < c1; ++c) out[c] = table[p[c]] * s;
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
