// Row-major GEMMs of the GPU trainer through cuBLAS, fp32 in and out. Precision::BF16 asks cuBLAS for
// CUBLAS_COMPUTE_32F_FAST_16BF; with fp32 operands cuBLAS 12 on Hopper answers that with its TF32 kernels
// (sm90_xmma_gemm_f32f32_tf32f32_f32 in the ncu profile, about 400 TFLOP/s on 8192^3 against 810 for
// bf16 operands; docs/TRAINING.md). rm on bf16 operands runs the native bf16 kernels.
// Precision::FP32 is plain fp32 (no TF32), for exact comparison with the CPU trainer.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace dsv3::train::cuda {

enum class Precision { FP32, BF16 };

Precision parse_precision(const std::string& s);  // "fp32" or "bf16"
const char* precision_name(Precision p);

class Gemm {
 public:
  Gemm(cudaStream_t stream, Precision precision);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  Precision precision() const { return precision_; }

  // C[M x N] = alpha * op(A) op(B) + beta * C, all row-major with leading dimensions (op(A) is M x K:
  // A is [M x K], or [K x M] when trans_a). `batch` problems at the given element strides.
  void rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int64_t batch = 1, int64_t stride_a = 0,
          int64_t stride_b = 0, int64_t stride_c = 0);

  // rm with bf16 A and B (C and the accumulation fp32): the native bf16 tensor-core kernels.
  void rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const __nv_bfloat16* A,
          int64_t lda, const __nv_bfloat16* B, int64_t ldb, float beta, float* C, int64_t ldc, int64_t batch = 1,
          int64_t stride_a = 0, int64_t stride_b = 0, int64_t stride_c = 0);
  // The same with C in bf16 (the fp32 result, plus beta times C read as fp32, rounded once): activations
  // that only bf16 operands and memory-bound kernels read.
  void rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const __nv_bfloat16* A,
          int64_t lda, const __nv_bfloat16* B, int64_t ldb, float beta, __nv_bfloat16* C, int64_t ldc,
          int64_t batch = 1, int64_t stride_a = 0, int64_t stride_b = 0, int64_t stride_c = 0);

  // The op pairs of train_ops.h: y = x W^T; dx = dy W (written, skipped when dx is null); dW += dy^T x.
  // x [n x in], W [out x in], y [n x out].
  // accumulate_dx: dx += dy W instead (a second branch's gradient joining dx).
  void linear_forward(float* y, const float* x, const float* W, int64_t n, int64_t in, int64_t out);
  void linear_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int64_t n,
                       int64_t in, int64_t out, bool accumulate_dx = false);
  // The same pair on bf16 operands (y, dx and dW fp32; dW still accumulates in fp32). dy_scale: the
  // products use dy * dy_scale (a loss scale applied after dy was rounded to bf16).
  void linear_forward(float* y, const __nv_bfloat16* x, const __nv_bfloat16* W, int64_t n, int64_t in,
                      int64_t out);
  void linear_backward(float* dx, float* dW, const __nv_bfloat16* dy, const __nv_bfloat16* x,
                       const __nv_bfloat16* W, int64_t n, int64_t in, int64_t out, bool accumulate_dx = false,
                       float dy_scale = 1.0f);
  // And with y / dx written in bf16 (dW still fp32): activations that only bf16 operands read.
  void linear_forward(__nv_bfloat16* y, const __nv_bfloat16* x, const __nv_bfloat16* W, int64_t n, int64_t in,
                      int64_t out);
  void linear_backward(__nv_bfloat16* dx, float* dW, const __nv_bfloat16* dy, const __nv_bfloat16* x,
                       const __nv_bfloat16* W, int64_t n, int64_t in, int64_t out);

 private:
  void gemm_ex(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
               int64_t lda, const void* B, int64_t ldb, cudaDataType_t ab_type, float beta, void* C,
               cudaDataType_t c_type, int64_t ldc, int64_t batch, int64_t stride_a, int64_t stride_b,
               int64_t stride_c, cublasComputeType_t compute);

  cudaStream_t stream_;
  Precision precision_;
  cublasHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
};

}  // namespace dsv3::train::cuda
