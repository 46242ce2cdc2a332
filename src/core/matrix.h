// Matrix: a weight matrix viewed in its stored dtype; kernels dequantize a row at a time.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace dsv3 {

// A row-major [rows x cols] weight matrix in its stored dtype. y = W x reads row r as the weights of
// output r. FP8 (e4m3) matrices carry block scales: real[r][c] = fp8[r][c] * scale_inv[r/br][c/bc],
// where the last block row/column may be partial.
struct Matrix {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::Unknown;       // F32, F16, BF16 or F8_E4M3
  const uint8_t* data = nullptr;
  const float* scale_inv = nullptr;   // FP8 only: [ceil(rows/br) x ceil(cols/bc)]
  int64_t block_rows = 0, block_cols = 0;

  bool empty() const { return data == nullptr; }
  // Writes the `cols` real values of row r into out (fp32).
  void dequantize_row(int64_t r, float* out) const;
  size_t bytes() const;  // bytes read to use the whole matrix once (data + scales)
};

}  // namespace dsv3
