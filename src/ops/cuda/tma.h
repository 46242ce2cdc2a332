// Tensor maps for Hopper's tensor-memory accelerator (TMA): the host-side descriptor of a row-major 2D
// matrix in global memory that a kernel's cp.async.bulk.tensor copies read in boxes (tma_load_2d in
// wgmma.cuh). Used by the grouped FP8 expert GEMM and the prefill attention.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace dsv3::cuda {

// A map over `rows` rows of `cols` elements of `elem_bytes` bytes each (rows `row_stride` elements apart;
// the stride a multiple of 16 bytes) in boxes of box_cols x box_rows, each landing in shared memory in the
// 128-byte swizzle that wgmma's descriptors name (box_cols x elem_bytes must be 128). Rows and columns
// past the matrix read as zeros. Throws when the driver refuses.
CUtensorMap tma_map_2d(const void* data, CUtensorMapDataType type, int64_t elem_bytes, int64_t rows,
                       int64_t cols, int64_t row_stride, uint32_t box_cols, uint32_t box_rows);

}  // namespace dsv3::cuda
