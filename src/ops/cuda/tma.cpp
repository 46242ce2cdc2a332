#include "ops/cuda/tma.h"

#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <string>

#include "core/error.h"

namespace dsv3::cuda {

namespace {

// cuTensorMapEncodeTiled from the driver (through the runtime, so nothing links libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
    check(err == cudaSuccess && found == cudaDriverEntryPointSuccess && f,
          "the CUDA driver has no cuTensorMapEncodeTiled (TMA)",
          "update the NVIDIA driver, or set DSV3_LT_GROUPED_FP8=0 and DSV3_MLA_PREFILL_TMA=0 to run without "
          "TMA");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

}  // namespace

CUtensorMap tma_map_2d(const void* data, CUtensorMapDataType type, int64_t elem_bytes, int64_t rows,
                       int64_t cols, int64_t row_stride, uint32_t box_cols, uint32_t box_rows) {
  DSV3_ASSERT(box_cols * elem_bytes == 128 && (row_stride * elem_bytes) % 16 == 0 && rows > 0 && cols > 0);
  CUtensorMap m;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_stride * elem_bytes)};
  const cuuint32_t box[2] = {box_cols, box_rows}, elem_strides[2] = {1, 1};
  const CUresult r = encode_fn()(&m, type, 2, const_cast<void*>(data), dims, strides, box, elem_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  check(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (" + std::to_string(static_cast<int>(r)) +
                               ") for a matrix of " + std::to_string(rows) + " x " + std::to_string(cols));
  return m;
}

}  // namespace dsv3::cuda
