// dsv3_bench_linear: the decode-sized linear layers of one batch-1 step, each timed alone, next to the
// device-to-device copy bandwidth measured in the same run. The shapes are a "lite" layer's (V2-Lite /
// Moonlight: hidden 2048, 16 heads, 64 routed experts of 1408, 6 chosen, the shared expert as 2 fixed
// pieces) in FP8 with 128x128 block scales, plus larger problems that show the kernel's rate once launch
// and tail costs are small. Each row: microseconds per call (back-to-back launches on one stream, as a
// captured step runs them), weight bytes read per call, GB/s, and that over the copy bandwidth.
// Each call reads other weights than the call before (copies of the matrix, other experts), as a
// decode step's layers do, so the rates are DRAM rates, not L2 ones.
// Usage: dsv3_bench_linear [--iters N] [--dtype fp8|bf16]. Tuning knobs of cuda::linear (DSV3_GEMV_*)
// come from the environment, read once per process.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "ops/cuda/ops.h"
#include "copy_bandwidth.h"

namespace {

using namespace dsv3;

struct DeviceArena {
  std::vector<void*> ptrs;
  ~DeviceArena() {
    for (void* p : ptrs) cudaFree(p);
  }
  void* alloc(size_t bytes) {
    void* p = nullptr;
    DSV3_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 16)));
    ptrs.push_back(p);
    return p;
  }
  template <class T>
  T* put(const std::vector<T>& v) {
    T* d = static_cast<T*>(alloc(v.size() * sizeof(T)));
    DSV3_CUDA_CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
  }
};

// Random weights in `dtype` (FP8: random bytes with the NaN codes replaced; BF16: small normals), and
// scales for FP8's 128x128 blocks.
cuda::DeviceMatrix random_matrix(DeviceArena& dev, std::mt19937& rng, DType dtype, int64_t rows, int64_t cols) {
  cuda::DeviceMatrix m;
  m.rows = rows;
  m.cols = cols;
  m.dtype = dtype;
  const size_t n = static_cast<size_t>(rows * cols);
  if (dtype == DType::F8_E4M3) {
    std::vector<uint8_t> b(n);
    for (auto& v : b) {
      v = static_cast<uint8_t>(rng());
      if ((v & 0x7f) == 0x7f) v = 0;
    }
    m.data = dev.put(b);
    std::vector<float> s(static_cast<size_t>(((rows + 127) / 128) * ((cols + 127) / 128)), 1e-3f);
    m.scale_inv = dev.put(s);
    m.block_rows = m.block_cols = 128;
  } else {
    std::normal_distribution<float> d(0.0f, 0.02f);
    std::vector<uint16_t> b(n);
    for (auto& v : b) v = f32_to_bf16(d(rng));
    m.data = dev.put(b);
  }
  return m;
}

// Median over 5 rounds of the mean time of `iters` back-to-back calls, in microseconds; call i gets i.
double time_us(const std::function<void(int)>& call, int iters) {
  cudaEvent_t e0, e1;
  DSV3_CUDA_CHECK(cudaEventCreate(&e0));
  DSV3_CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 10; ++i) call(i);
  std::vector<double> rounds;
  for (int r = 0; r < 5; ++r) {
    DSV3_CUDA_CHECK(cudaEventRecord(e0));
    for (int i = 0; i < iters; ++i) call(i);
    DSV3_CUDA_CHECK(cudaEventRecord(e1));
    DSV3_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    rounds.push_back(1e3 * ms / iters);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(rounds.begin(), rounds.end());
  return rounds[2];
}

int run(int argc, char** argv) {
  int iters = 200;
  DType dtype = DType::F8_E4M3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc) {
      iters = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--dtype" && i + 1 < argc) {
      const std::string d = argv[++i];
      if (d == "fp8") dtype = DType::F8_E4M3;
      else if (d == "bf16") dtype = DType::BF16;
      else throw Error("--dtype " + d + " is not known", "use fp8 or bf16");
    } else {
      throw Error("unknown argument " + a, "usage: dsv3_bench_linear [--iters N] [--dtype fp8|bf16]");
    }
  }
  DeviceArena dev;
  std::mt19937 rng(1);
  const double bw = bench::copy_bandwidth(size_t{1} << 30);
  cudaDeviceProp prop{};
  DSV3_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs, copy bandwidth %.0f GB/s, %s weights, %d calls per timing\n\n", prop.name,
              prop.multiProcessorCount, bw / 1e9, dtype_name(dtype), iters);
  std::printf("| linear | shape | us/call | MB read | GB/s | of copy bandwidth |\n|---|---|---:|---:|---:|---:|\n");

  const int64_t D = 2048, H = 16, E = 64, F = 2, k = 6, I = 1408, S = k + F, esz = dtype_size(dtype);
  const size_t kmax = 64 * 8;  // enough problems for the largest call below
  std::vector<float> xh(static_cast<size_t>(kmax * 4096));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& v : xh) v = nd(rng);
  const float* x = dev.put(xh);
  float* y = static_cast<float*>(dev.alloc(kmax * 16384 * sizeof(float)));
  DSV3_CUDA_CHECK(cudaMemset(y, 0, kmax * 16384 * sizeof(float)));
  const float* norm = dev.put(std::vector<float>(static_cast<size_t>(D), 1.0f));

  // Call i runs variant i % variants.size(): copies of the weights (or other expert choices) so that the
  // calls, like a decode step's layers, read their weights from memory rather than from L2.
  auto rows = [&](const char* name, const std::string& shape, double bytes,
                  const std::vector<cuda::LinearParams>& variants) {
    const double us =
        time_us([&](int i) { cuda::linear(variants[static_cast<size_t>(i) % variants.size()]); }, iters);
    const double gbs = bytes / (us * 1e-6) / 1e9;
    std::printf("| %s | %s | %.2f | %.2f | %.0f | %.1f%% |\n", name, shape.c_str(), us, bytes / 1e6, gbs,
                100.0 * gbs * 1e9 / bw);
  };
  // Weight copies: at least 256 MB of them (5 x the H100/H200 L2), at most 200.
  auto copies = [&](double bytes) { return static_cast<int>(std::clamp(256e6 / bytes, 1.0, 200.0)); };
  auto plain = [&](const cuda::DeviceMatrix& w, int64_t n) {
    cuda::LinearParams p;
    p.w = w;
    p.n = n;
    p.out = w.rows;
    p.x = x;
    p.ldx = w.cols;
    p.y = y;
    p.ldy = w.rows;
    return p;
  };
  const double mat = static_cast<double>(esz);

  // `n` copies of a random matrix, each with the same call around it (`make` turns a matrix into params).
  auto variants = [&](DType dt, int64_t r, int64_t c,
                      const std::function<cuda::LinearParams(const cuda::DeviceMatrix&)>& make) {
    std::vector<cuda::LinearParams> v;
    const int n = copies(static_cast<double>(dtype_size(dt)) * static_cast<double>(r * c));
    for (int i = 0; i < n; ++i) v.push_back(make(random_matrix(dev, rng, dt, r, c)));
    return v;
  };

  // Attention projections of one token: q and kv_a together behind the input norm, o_proj, W_UV per head.
  rows("q + kv_a, normed", "3648 x 2048", mat * (H * 192 + 576) * D,
       variants(dtype, H * 192 + 576, D, [&](const cuda::DeviceMatrix& w) {
         cuda::LinearParams p = plain(w, 1);
         p.norm = norm;
         p.norm_eps = 1e-6f;
         return p;
       }));
  rows("o_proj", "2048 x 2048", mat * D * H * 128,
       variants(dtype, D, H * 128, [&](const cuda::DeviceMatrix& w) { return plain(w, 1); }));
  rows("W_UV per head", "16 x 128 x 512", mat * H * 128 * 512,
       variants(dtype, H * 256, 512, [&](const cuda::DeviceMatrix& w) {
         cuda::LinearParams p = plain(w, 1);
         p.out = H * 128;
         p.group_rows = 128;
         p.group_stride = 256;
         p.row0 = 128;
         p.group_x = 512;
         p.ldy = p.out;
         return p;
       }));
  // The router: BF16 in the FP8 checkpoints too, behind the post-attention norm.
  rows("router (BF16), normed", "64 x 2048", 2.0 * E * D,
       variants(DType::BF16, E, D, [&](const cuda::DeviceMatrix& w) {
         cuda::LinearParams p = plain(w, 1);
         p.norm = norm;
         p.norm_eps = 1e-6f;
         return p;
       }));

  // The MoE of one token: gate/up of 6 routed + 2 shared pieces (SwiGLU), down with the weighted combine.
  // 16 sets of routing choices (each token's k experts distinct), one per call in turn.
  std::vector<cuda::DeviceMatrix> gate, up, down;
  std::vector<cuda::MatrixPtrs> tg, tu, td;
  for (int64_t e = 0; e < E + F; ++e) {
    gate.push_back(random_matrix(dev, rng, dtype, I, D));
    up.push_back(random_matrix(dev, rng, dtype, I, D));
    down.push_back(random_matrix(dev, rng, dtype, D, I));
    tg.push_back({gate.back().data, gate.back().scale_inv});
    tu.push_back({up.back().data, up.back().scale_inv});
    td.push_back({down.back().data, down.back().scale_inv});
  }
  const cuda::MatrixPtrs *dg = dev.put(tg), *du = dev.put(tu), *dd = dev.put(td);
  constexpr int kSets = 16;
  std::vector<const int32_t*> id_sets;
  for (int set = 0; set < kSets; ++set) {
    std::vector<int32_t> idh(kmax);
    std::vector<int32_t> perm(static_cast<size_t>(E));
    for (size_t t = 0; t < idh.size() / k; ++t) {
      for (int64_t e = 0; e < E; ++e) perm[static_cast<size_t>(e)] = static_cast<int32_t>(e);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int64_t j = 0; j < k; ++j) idh[t * k + static_cast<size_t>(j)] = perm[static_cast<size_t>(j)];
    }
    id_sets.push_back(dev.put(idh));
  }
  std::vector<float> wh(kmax, 0.1f);
  const float* wts = dev.put(wh);
  auto gate_up = [&](int64_t tokens) {
    std::vector<cuda::LinearParams> v;
    for (const int32_t* ids : id_sets) {
      cuda::LinearParams p = plain(gate[0], tokens * S);
      p.experts = dg;
      p.experts2 = du;
      p.ids = ids;
      p.ids_settled = true;
      p.x_div = S;
      p.fixed_experts = F;
      p.fixed_first = E;
      p.norm = norm;
      p.norm_eps = 1e-6f;
      v.push_back(p);
    }
    return v;
  };
  auto down_combine = [&](int64_t tokens) {
    std::vector<cuda::LinearParams> v;
    for (const int32_t* ids : id_sets) {
      cuda::LinearParams p = plain(down[0], tokens);
      p.experts = dd;
      p.ids = ids;
      p.ids_settled = true;
      p.combine = wts;
      p.combine_k = k;
      p.fixed_experts = F;
      p.fixed_first = E;
      p.x = x;
      p.ldx = I;
      p.accumulate = true;
      v.push_back(p);
    }
    return v;
  };
  const double expert = mat * I * D;
  rows("expert gate/up, normed", "8 slots x 2 x 1408 x 2048", 2 * S * expert, gate_up(1));
  rows("expert down + combine", "8 slots x 2048 x 1408", S * expert, down_combine(1));

  // Larger problems: the kernel's own rate.
  rows("plain, large", "16384 x 2048", mat * 16384 * D,
       variants(dtype, 16384, D, [&](const cuda::DeviceMatrix& w) { return plain(w, 1); }));
  rows("plain, V3 width", "4096 x 7168", mat * 4096 * 7168,
       variants(dtype, 4096, 7168, [&](const cuda::DeviceMatrix& w) { return plain(w, 1); }));
  rows("lm_head (BF16)", "102400 x 2048", 2.0 * 102400 * D,
       variants(DType::BF16, 102400, D, [&](const cuda::DeviceMatrix& w) { return plain(w, 1); }));
  rows("expert gate/up, 4 tokens", "32 slots x 2 x 1408 x 2048", 2 * 4 * S * expert, gate_up(4));
  rows("expert down + combine, 4 tokens", "4 x 8 slots x 2048 x 1408", 4 * S * expert, down_combine(4));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3_bench_linear: %s\n", e.what());
    return 1;
  }
}
