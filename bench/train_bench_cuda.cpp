// Training speed on one GPU: tokens/s and model-FLOPs utilization of `dsv3 train --device cuda` for a
// trainer config, next to the cuBLAS BF16 GEMM rate measured in the same process (the roofline).
//
//   dsv3_bench_train CONFIG [--steps N] [--warmup N] [--precision bf16|fp32] [--batch B] [--seq S]
//                    [--attention fused|explicit|tf32]   (fused: the flash-style kernels, the default in bf16
//                                                         mode; explicit: S x S products on bf16 operands;
//                                                         tf32: on fp32 operands, run 7's path)
//                    [--linears bf16|tf32]   (bf16 mode: the non-expert linear layers on bf16 operands, the
//                                             default, or on fp32 operands that cuBLAS runs as TF32)
//   DSV3_TRAIN_EXPERTS=per-expert|padded|padded16 picks the routed experts' GEMMs (docs/TRAINING.md).
//
// Data: uniformly random token ids (speed does not depend on the text). Model FLOPs per optimizer step
// (PaLM's convention, docs/PERF.md):
//   6 * (N_main * T + N_mtp * T_mtp)  +  6 * S * H * (dq + dv) * (L * T + T_mtp)
// where T = tokens the main model reads per step, T_mtp = B*(S-1) per micro-batch, N_main = the
// matrix parameters a main-model token multiplies (all but the embedding table, routed experts at
// k/E, lm_head included), N_mtp = the same for the MTP module (eh_proj, its layer, lm_head again); the
// attention term counts the full S x S score and value products (what the kernels compute).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/json.h"
#include "ops/cuda/ops.h"
#include "train/cuda/cuda_train_model.h"
#include "train/trainer.h"

namespace {

using namespace dsv3;
namespace tc = dsv3::train::cuda;
using namespace dsv3::train;

struct Flops {
  double n_main = 0, n_mtp = 0, per_step = 0;
};

Flops model_flops(const TrainModel<float>& m, const TrainConfig& c) {
  const ModelConfig& cfg = m.config();
  const std::string mtp = mtp_prefix(cfg);
  Flops f;
  for (const Param<float>* p : m.params()) {
    if (p->shape.size() != 2 || p->name == "model.embed_tokens.weight") continue;
    double n = static_cast<double>(p->numel());
    if (p->name.find(".mlp.experts.") != std::string::npos)
      n *= static_cast<double>(cfg.num_experts_per_tok) / static_cast<double>(cfg.n_routed_experts);
    if (p->name == "lm_head.weight") {
      f.n_main += n;
      if (m.has_mtp()) f.n_mtp += n;
    } else if (p->name.rfind(mtp, 0) == 0) {
      f.n_mtp += n;
    } else {
      f.n_main += n;
    }
  }
  const double T = static_cast<double>(c.grad_accum * c.batch_size * c.seq_len);
  const double Tm = m.has_mtp() ? static_cast<double>(c.grad_accum * c.batch_size * (c.seq_len - 1)) : 0.0;
  const double attn = 6.0 * static_cast<double>(c.seq_len) * static_cast<double>(cfg.num_attention_heads) *
                      static_cast<double>(cfg.qk_head_dim() + cfg.v_head_dim);
  f.per_step = 6.0 * (f.n_main * T + f.n_mtp * Tm) +
               attn * (static_cast<double>(cfg.num_hidden_layers) * T + Tm);
  return f;
}

// TFLOP/s of an M=N=K=n GEMM through cuBLAS: BF16 inputs and outputs with fp32 accumulation (the card's
// dense BF16 rate), and fp32 inputs with CUBLAS_COMPUTE_32F_FAST_16BF (what the trainer's GEMMs use).
double gemm_tflops(int n, bool fp32_inputs) {
  cublasHandle_t h;
  cublasCreate(&h);
  const size_t elems = static_cast<size_t>(n) * n, es = fp32_inputs ? 4 : 2;
  void *a, *b, *c;
  DSV3_CUDA_CHECK(cudaMalloc(&a, elems * es));
  DSV3_CUDA_CHECK(cudaMalloc(&b, elems * es));
  DSV3_CUDA_CHECK(cudaMalloc(&c, elems * es));
  {
    // Random-ish bits: small values in either type (zeros run faster than real data).
    std::vector<float> host(elems);
    for (size_t i = 0; i < elems; ++i) host[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
    std::vector<__nv_bfloat16> hb(elems);
    for (size_t i = 0; i < elems; ++i) hb[i] = __float2bfloat16(host[i]);
    const void* src = fp32_inputs ? static_cast<const void*>(host.data()) : static_cast<const void*>(hb.data());
    DSV3_CUDA_CHECK(cudaMemcpy(a, src, elems * es, cudaMemcpyHostToDevice));
    DSV3_CUDA_CHECK(cudaMemcpy(b, src, elems * es, cudaMemcpyHostToDevice));
  }
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType_t t = fp32_inputs ? CUDA_R_32F : CUDA_R_16BF;
  const cublasComputeType_t compute = fp32_inputs ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
  auto run = [&] {
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, t, n, b, t, n, &beta, c, t, n, compute,
                 CUBLAS_GEMM_DEFAULT);
  };
  for (int i = 0; i < 3; ++i) run();
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
  const int reps = 20;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) run();
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cublasDestroy(h);
  return 2.0 * n * static_cast<double>(n) * n * reps / s / 1e12;
}

int run(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: %s CONFIG [--steps N] [--warmup N] [--precision bf16|fp32] [--batch B] [--seq S] "
                 "[--attention fused|explicit|tf32] [--linears bf16|tf32]\n",
                 argv[0]);
    return 2;
  }
  const std::string config_path = argv[1];
  int64_t steps = 10, warmup = 2, batch = 0, seq = 0;
  std::string precision = "bf16", attention = "fused", linears = "bf16";
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--steps") steps = std::stoll(v);
    else if (f == "--warmup") warmup = std::stoll(v);
    else if (f == "--precision") precision = v;
    else if (f == "--batch") batch = std::stoll(v);
    else if (f == "--seq") seq = std::stoll(v);
    else if (f == "--attention")
      attention = v;
    else if (f == "--linears")
      linears = v;
    else
      throw Error("unknown flag " + f, "flags: --steps --warmup --precision --batch --seq --attention --linears");
  }
  if (linears != "bf16" && linears != "tf32") {
    throw Error("--linears " + linears + " is not an operand type",
                "use --linears bf16 (the default) or tf32");
  }
  if (attention != "fused" && attention != "explicit" && attention != "tf32") {
    throw Error("--attention " + attention + " is not an attention path",
                "use --attention fused (the default), explicit (S x S products on bf16 operands) or tf32 (on "
                "fp32 operands)");
  }
  Json config = read_json_file(config_path);
  if (!config.contains("training")) config["training"] = Json::object();
  if (batch > 0) config["training"]["batch_size"] = batch;
  if (seq > 0) config["training"]["seq_len"] = seq;
  config["training"]["steps"] = warmup + steps;
  config["training"]["eval_fraction"] = 0.0;
  const ModelConfig mc = ModelConfig::from_json(config, config_path);
  const TrainConfig tc = TrainConfig::from_json(config, config_path, mc);
  const int64_t tokens_per_step = tc.grad_accum * tc.batch_size * tc.seq_len;
  std::vector<int32_t> data(static_cast<size_t>((warmup + steps + 1) * tc.grad_accum * tc.batch_size * (tc.seq_len + 1)));
  uint64_t x = 88172645463325252ull;
  for (int32_t& t : data) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    t = static_cast<int32_t>(x % static_cast<uint64_t>(mc.vocab_size));
  }
  Trainer trainer(config, config_path, std::move(data));
  auto backend = std::make_unique<tc::CudaTrainModel>(trainer.model(), trainer.optimizer(),
                                                        AdamWConfig{tc.beta1, tc.beta2, tc.eps, tc.weight_decay},
                                                        tc::parse_precision(precision));
  tc::CudaTrainModel* gpu = backend.get();
  gpu->set_fused_attention(attention == "fused");
  gpu->set_bf16_attention(attention != "tf32");
  gpu->set_bf16_linears(linears == "bf16");
  trainer.set_backend(std::move(backend));
  const Flops f = model_flops(trainer.model(), tc);
  std::printf("config: %s\nmodel: %s\nparameters: %lld total, %.1fM active per main token (matrices, experts at k/E)\n",
              config_path.c_str(), mc.summary().c_str(), static_cast<long long>(trainer.model().num_params()),
              f.n_main / 1e6);
  std::printf(
      "batch: %lld x %lld tokens x %lld micro-batches = %lld tokens/step; precision %s, %s attention, "
      "linear layers on %s operands\n",
      static_cast<long long>(tc.batch_size), static_cast<long long>(tc.seq_len),
      static_cast<long long>(tc.grad_accum), static_cast<long long>(tokens_per_step), precision.c_str(),
      gpu->fused_attention()  ? "fused"
      : gpu->bf16_attention() ? "explicit, bf16 operands"
                              : "explicit, fp32 operands",
      gpu->bf16_linears() ? "bf16" : "fp32");
  std::printf("device: %s\n", tc::gpu_description().c_str());
  for (int64_t i = 0; i < warmup; ++i) trainer.step();
  // DSV3_PROFILE=1: one more step inside cudaProfilerStart/Stop, for `ncu --profile-from-start off`.
  if (const char* prof = std::getenv("DSV3_PROFILE"); prof && *prof == '1') {
    DSV3_CUDA_CHECK(cudaProfilerStart());
    trainer.step();
    DSV3_CUDA_CHECK(cudaProfilerStop());
  }
  double secs = 0, loss = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const StepInfo s = trainer.step();
    secs += s.seconds;
    loss = s.loss.total;
  }
  const double tps = static_cast<double>(tokens_per_step * steps) / secs;
  const double achieved = f.per_step * static_cast<double>(steps) / secs / 1e12;
  const double bf16 = gemm_tflops(8192, false), fast = gemm_tflops(8192, true);
  std::printf("step: %.1f ms (mean of %lld after %lld warm-up), last loss %.4f\n", 1e3 * secs / static_cast<double>(steps),
              static_cast<long long>(steps), static_cast<long long>(warmup), loss);
  std::printf("memory: %.2f GiB parameters+grads+moments, %.2f GiB activations\n",
              static_cast<double>(gpu->param_bytes()) / (1 << 30), static_cast<double>(gpu->activation_bytes()) / (1 << 30));
  std::printf("tokens/s: %.0f\nmodel TFLOP/s: %.1f (%.3g TFLOP per step)\n", tps, achieved, f.per_step / 1e12);
  std::printf("cuBLAS 8192^3 GEMM: %.0f TFLOP/s bf16 in/out, %.0f TFLOP/s fp32 in/out FAST_16BF\n", bf16, fast);
  std::printf("MFU: %.1f%% of the measured bf16 GEMM rate (%.1f%% of the FAST_16BF rate; %.1f%% of 989 TFLOP/s "
              "H100 SXM dense bf16 spec)\n",
              100 * achieved / bf16, 100 * achieved / fast, 100 * achieved / 989.0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
