#include "train/cuda/gemm.h"

#include "core/error.h"
#include "ops/cuda/ops.h"

namespace dsv3::train::cuda {

namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // cuBLAS's recommendation for Hopper

void check_cublas(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return;
  throw Error(std::string("cuBLAS error: ") + cublasGetStatusName(st) + " (" + what + ")",
              st == CUBLAS_STATUS_ALLOC_FAILED ? "the GPU is out of memory: use a smaller batch_size or seq_len"
                                               : "");
}

}  // namespace

Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::FP32;
  if (s == "bf16") return Precision::BF16;
  throw Error("unknown --precision '" + s + "'", "use bf16 (tensor cores, fp32 accumulation) or fp32");
}

const char* precision_name(Precision p) { return p == Precision::FP32 ? "fp32" : "bf16"; }

Gemm::Gemm(cudaStream_t stream, Precision precision) : stream_(stream), precision_(precision) {
  check_cublas(cublasCreate(&handle_), "cublasCreate");
  check_cublas(cublasSetStream(handle_, stream_), "cublasSetStream");
  DSV3_CUDA_CHECK(cudaMalloc(&workspace_, kWorkspaceBytes));
  check_cublas(cublasSetWorkspace(handle_, workspace_, kWorkspaceBytes), "cublasSetWorkspace");
  // FP32 means IEEE fp32 products: never TF32.
  check_cublas(cublasSetMathMode(handle_, precision_ == Precision::FP32 ? CUBLAS_PEDANTIC_MATH : CUBLAS_DEFAULT_MATH),
               "cublasSetMathMode");
}

Gemm::~Gemm() {
  if (handle_) cublasDestroy(handle_);
  if (workspace_) cudaFree(workspace_);
}

void Gemm::rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
              int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, int64_t batch,
              int64_t stride_a, int64_t stride_b, int64_t stride_c) {
  gemm_ex(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, CUDA_R_32F, beta, C, CUDA_R_32F, ldc, batch,
          stride_a, stride_b, stride_c,
          precision_ == Precision::BF16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F_PEDANTIC);
}

void Gemm::rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const __nv_bfloat16* A,
              int64_t lda, const __nv_bfloat16* B, int64_t ldb, float beta, float* C, int64_t ldc, int64_t batch,
              int64_t stride_a, int64_t stride_b, int64_t stride_c) {
  gemm_ex(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, CUDA_R_16BF, beta, C, CUDA_R_32F, ldc, batch,
          stride_a, stride_b, stride_c, CUBLAS_COMPUTE_32F);
}

void Gemm::rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const __nv_bfloat16* A, int64_t lda, const __nv_bfloat16* B, int64_t ldb, float beta,
              __nv_bfloat16* C, int64_t ldc, int64_t batch, int64_t stride_a, int64_t stride_b,
              int64_t stride_c) {
  gemm_ex(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, CUDA_R_16BF, beta, C, CUDA_R_16BF, ldc, batch,
          stride_a, stride_b, stride_c, CUBLAS_COMPUTE_32F);
}

void Gemm::gemm_ex(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                   int64_t lda, const void* B, int64_t ldb, cudaDataType_t ab_type, float beta, void* C,
                   cudaDataType_t c_type, int64_t ldc, int64_t batch, int64_t stride_a, int64_t stride_b,
                   int64_t stride_c, cublasComputeType_t compute) {
  if (M == 0 || N == 0 || batch == 0) return;
  if (K == 0) {
    check(beta == 1.0f || beta == 0.0f, "Gemm::rm: an empty product needs beta 0 or 1");
    const size_t elem = c_type == CUDA_R_16BF ? 2 : 4;
    if (beta == 0.0f)
      for (int64_t b = 0; b < batch; ++b)
        DSV3_CUDA_CHECK(cudaMemset2DAsync(static_cast<char*>(C) + b * stride_c * elem,
                                          static_cast<size_t>(ldc) * elem, 0, static_cast<size_t>(N) * elem,
                                          static_cast<size_t>(M), stream_));
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, and a row-major matrix read
  // column-major is its transpose: so B goes first, each with its own transpose flag.
  check_cublas(cublasGemmStridedBatchedEx(handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                          trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N),
                                          static_cast<int>(M), static_cast<int>(K), &alpha, B, ab_type,
                                          static_cast<int>(ldb), stride_b, A, ab_type, static_cast<int>(lda),
                                          stride_a, &beta, C, c_type, static_cast<int>(ldc), stride_c,
                                          static_cast<int>(batch), compute, CUBLAS_GEMM_DEFAULT),
               "cublasGemmStridedBatchedEx");
}

void Gemm::linear_forward(float* y, const float* x, const float* W, int64_t n, int64_t in, int64_t out) {
  rm(false, true, n, out, in, 1.0f, x, in, W, in, 0.0f, y, out);
}

void Gemm::linear_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int64_t n,
                           int64_t in, int64_t out, bool accumulate_dx) {
  if (dx) rm(false, false, n, in, out, 1.0f, dy, out, W, in, accumulate_dx ? 1.0f : 0.0f, dx, in);
  rm(true, false, out, in, n, 1.0f, dy, out, x, in, 1.0f, dW, in);
}

void Gemm::linear_forward(float* y, const __nv_bfloat16* x, const __nv_bfloat16* W, int64_t n, int64_t in,
                          int64_t out) {
  rm(false, true, n, out, in, 1.0f, x, in, W, in, 0.0f, y, out);
}

void Gemm::linear_forward(__nv_bfloat16* y, const __nv_bfloat16* x, const __nv_bfloat16* W, int64_t n,
                          int64_t in, int64_t out) {
  rm(false, true, n, out, in, 1.0f, x, in, W, in, 0.0f, y, out);
}

void Gemm::linear_backward(__nv_bfloat16* dx, float* dW, const __nv_bfloat16* dy, const __nv_bfloat16* x,
                           const __nv_bfloat16* W, int64_t n, int64_t in, int64_t out) {
  rm(false, false, n, in, out, 1.0f, dy, out, W, in, 0.0f, dx, in);
  rm(true, false, out, in, n, 1.0f, dy, out, x, in, 1.0f, dW, in);
}

void Gemm::linear_backward(float* dx, float* dW, const __nv_bfloat16* dy, const __nv_bfloat16* x,
                           const __nv_bfloat16* W, int64_t n, int64_t in, int64_t out, bool accumulate_dx,
                           float dy_scale) {
  if (dx) rm(false, false, n, in, out, dy_scale, dy, out, W, in, accumulate_dx ? 1.0f : 0.0f, dx, in);
  rm(true, false, out, in, n, dy_scale, dy, out, x, in, 1.0f, dW, in);
}

}  // namespace dsv3::train::cuda
