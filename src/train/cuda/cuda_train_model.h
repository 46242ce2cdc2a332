// CudaTrainModel: the GPU backend of the trainer (docs/TRAINING.md, "CUDA"). It mirrors TrainModel<float>
// (train/train_model.cpp) op for op on one GPU: fp32 master weights, gradients and AdamW moments in
// device memory, GEMMs through cuBLAS (train/cuda/gemm.h; or plain fp32), everything else in the kernels of
// train/cuda/train_kernels.h with fp32 activations. In BF16 mode the head, the attention (fused kernels),
// the non-expert linear layers (attention projections, dense MLP, shared experts, MTP's eh_proj) and the
// routed experts run on bf16 operands with fp32 accumulation: bf16 copies of the weights written by each
// AdamW step, bf16 copies of the inputs written by the producing kernels (norms, SwiGLU) or one rounding
// pass; the router gate keeps fp32 operands (cuBLAS runs those as TF32).
//
// The MoE router runs on the device (train_kernels.h: route_tokens, moe_permute, router_backward): gate
// logits -> expert choice and weights (the CPU trainer's route_forward choices, ties included) -> the
// permutation of tokens into per-expert segments, padded to one size so that each product is one batched
// GEMM over the experts (or, with DSV3_TRAIN_EXPERTS=per-expert, one cuBLAS GEMM per expert). Per MoE
// layer only the E segment sizes come back to the host (the GEMM shapes), while the shared expert runs;
// the backward reuses them. Expert loads accumulate on the device and reach the store's BalanceState once
// per optimizer step (and on pull), where the bias update runs. The optional sequence-wise balance loss
// (alpha > 0) runs on the device too; its per-sequence values come back with the loss.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "train/backend.h"
#include "train/cuda/gemm.h"

namespace dsv3::train::cuda {

class CudaTrainModel final : public TrainBackend {
 public:
  // `store` and `opt` are the trainer's parameter store and optimizer (they must outlive this).
  // Throws dsv3::Error when there is no GPU or the parameters do not fit.
  CudaTrainModel(TrainModel<float>& store, AdamW<float>& opt, const AdamWConfig& adamw, Precision precision);
  ~CudaTrainModel() override;
  CudaTrainModel(const CudaTrainModel&) = delete;
  CudaTrainModel& operator=(const CudaTrainModel&) = delete;

  std::string name() const override;
  LossParts forward(const int32_t* tokens, int64_t B, int64_t S, bool count_load) override;
  void backward(double scale) override;
  void zero_grad() override;
  double clip_grad_norm(double max_norm) override;
  void optimizer_step(double lr) override;
  void push() override;
  void pull(bool grads) override;

  // Logits of the last forward (before backward, which overwrites them), copied to the host.
  std::vector<float> logits() const;
  std::vector<float> mtp_logits() const;
  // Device memory in use for parameters, gradients and moments; for activations (high-water mark).
  int64_t param_bytes() const;
  int64_t activation_bytes() const;
  // Attention: in BF16 mode, by default, the fused flash-style kernels (flash_attention.cu: no S x S tensor
  // in memory; q/k widths up to 192, v up to 128). set_fused_attention(false), FP32 mode and wider heads
  // take the explicit path (S x S score tensors, cuBLAS batched GEMMs, the warp-per-row softmax kernels of
  // train_kernels.h). fused_attention() says which applies (docs/TRAINING.md).
  void set_fused_attention(bool on);
  bool fused_attention() const;
  // BF16 mode: the non-expert linear layers on bf16 operands (the default) or on fp32 operands that cuBLAS
  // runs as TF32 (set_bf16_linears(false)). bf16_linears() says whether they run on bf16 now (never in
  // FP32 mode).
  void set_bf16_linears(bool on);
  bool bf16_linears() const;
  // BF16 mode, explicit attention: its S x S products (scores, P V and the four of the backward) on bf16
  // operands (q, keys, v and dO rounded; the probabilities and dS written in bf16 by the softmax kernels;
  // scores and dP in fp32) instead of fp32 operands (TF32). On by default; bf16_attention() says whether
  // it applies (never in FP32 mode or with the fused attention).
  void set_bf16_attention(bool on);
  bool bf16_attention() const;

  // The routed experts' GEMMs, set at construction (DSV3_TRAIN_EXPERTS overrides; docs/TRAINING.md):
  // "padded" (each product one strided-batched call over the experts' rows padded to a common count; the
  // FP32 default), "padded16" (that on bf16 operands; the BF16 default, FP32 mode takes it as padded) or
  // "per-expert" (one cuBLAS call per expert and product). A layer whose expert tensors are not evenly
  // spaced in the parameter slab runs per expert (a note on stderr), and then this says "per-expert".
  std::string expert_gemms() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Name and memory of GPU 0, for logs ("NVIDIA H100 80GB HBM3, 79.1 GiB"); throws without a GPU.
std::string gpu_description();

}  // namespace dsv3::train::cuda
