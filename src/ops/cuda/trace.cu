// Host side of the block timelines (trace.cuh): one buffer for all translation units, pointed to by each
// one's g_trace while recording.
#include <iterator>
#include <string>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

const char* trace_kernel_name(TraceKernel k) {
  static constexpr const char* kNames[] = {
      "gemv",        "swiglu_stream",      "mla_prepare", "mla_attention", "mla_attention_mma",
      "mla_combine", "mla_combine_values", "route",       "draw",          "embed",
      "rmsnorm"};  // TraceKernel's order
  static_assert(std::size(kNames) == static_cast<size_t>(TraceKernel::RMSNorm) + 1);
  const auto i = static_cast<size_t>(k);
  return i < std::size(kNames) ? kNames[i] : "?";
}

#ifdef DSV3_CUDA_TRACE

// The translation units whose kernels record (DSV3_TRACE_ATTACH in each).
void trace_attach_elementwise(const TraceBuffer& b);
void trace_attach_linear(const TraceBuffer& b);
void trace_attach_mla(const TraceBuffer& b);
void trace_attach_route(const TraceBuffer& b);
void trace_attach_row_stream(const TraceBuffer& b);
void trace_attach_sample(const TraceBuffer& b);

namespace {

TraceBuffer g_buffer;  // the device buffer while recording (host copy)

void attach_all(const TraceBuffer& b) {
  trace_attach_elementwise(b);
  trace_attach_linear(b);
  trace_attach_mla(b);
  trace_attach_route(b);
  trace_attach_row_stream(b);
  trace_attach_sample(b);
}

}  // namespace

bool trace_built() {
  return true;
}

void trace_start(int64_t per_sm) {
  check(per_sm > 0 && per_sm <= (int64_t{1} << 24), "trace_start: records per SM must be in 1 .. 16M",
        "pass a positive capacity");
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
  check(g_buffer.rec == nullptr, "trace_start: a trace is already recording", "call trace_stop first");
  const int64_t sms = sm_count();
  DSV3_CUDA_CHECK(cudaMalloc(&g_buffer.rec, static_cast<size_t>(sms * per_sm) * sizeof(TraceRecord)));
  DSV3_CUDA_CHECK(cudaMalloc(&g_buffer.count, static_cast<size_t>(sms) * sizeof(unsigned long long)));
  DSV3_CUDA_CHECK(cudaMemset(g_buffer.count, 0, static_cast<size_t>(sms) * sizeof(unsigned long long)));
  g_buffer.per_sm = static_cast<uint32_t>(per_sm);
  attach_all(g_buffer);
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
}

std::vector<TraceRecord> trace_stop(int64_t* dropped) {
  check(g_buffer.rec != nullptr, "trace_stop: no trace is recording", "call trace_start first");
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
  attach_all(TraceBuffer{});
  const int64_t sms = sm_count();
  std::vector<unsigned long long> count(static_cast<size_t>(sms));
  DSV3_CUDA_CHECK(
      cudaMemcpy(count.data(), g_buffer.count, count.size() * sizeof(count[0]), cudaMemcpyDeviceToHost));
  std::vector<TraceRecord> out;
  int64_t lost = 0;
  for (int64_t s = 0; s < sms; ++s) {
    const int64_t kept = std::min<int64_t>(static_cast<int64_t>(count[s]), g_buffer.per_sm);
    lost += static_cast<int64_t>(count[s]) - kept;
    const size_t at = out.size();
    out.resize(at + static_cast<size_t>(kept));
    DSV3_CUDA_CHECK(cudaMemcpy(out.data() + at, g_buffer.rec + s * g_buffer.per_sm,
                               static_cast<size_t>(kept) * sizeof(TraceRecord), cudaMemcpyDeviceToHost));
  }
  DSV3_CUDA_CHECK(cudaFree(g_buffer.rec));
  DSV3_CUDA_CHECK(cudaFree(g_buffer.count));
  g_buffer = TraceBuffer{};
  if (dropped) *dropped = lost;
  return out;
}

#else

bool trace_built() {
  return false;
}

namespace {
[[noreturn]] void not_built(const char* call) {
  throw Error(std::string(call) + ": this build does not record block timelines",
              "configure the build with -DDSV3_CUDA_TRACE=ON (a measurement build; its kernels differ)");
}
}  // namespace

void trace_start(int64_t) {
  not_built("trace_start");
}

std::vector<TraceRecord> trace_stop(int64_t*) {
  not_built("trace_stop");
}

#endif

}  // namespace dsv3::cuda
