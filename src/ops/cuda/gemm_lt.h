// cuBLASLt GEMMs for prefill-sized plain projections (see LinearParams::lt in ops.h).
#pragma once

#include <functional>

#include "ops/cuda/ops.h"

namespace dsv3::cuda {

// Runs p on cuBLASLt and returns true when p is eligible: p.lt, at least lt_min_rows() rows, one group,
// no experts, FP8 (128x128 blocks, row0 and k whole blocks) or BF16 weights, 16-byte aligned rows, and
// (while p.stream is being captured) buffers already large enough. Otherwise returns false and
// enqueues nothing.
bool linear_lt(const LinearParams& p);

// Where linear_lt would run p with FP8 activations of whole 128-column blocks and no norm: the buffers it
// quantizes p's input into, so that the kernel producing that input can write the operand itself: codes
// [scale_ld rows x k] (rows from p.n on are zeroed here, on p.stream) and scales [k / 128][scale_ld],
// scale_ld = p.n rounded up to 16. The producer fills rows < p.n, then linear_lt(p with x_quantized)
// runs the GEMM on them; no other cuBLASLt projection may run on p.stream in between (they share the
// buffers). {} (q null) where linear_lt would not take p that way.
struct LtOperand {
  uint8_t* q = nullptr;
  float* scales = nullptr;
  int64_t scale_ld = 0;
  int64_t k = 0;  // codes per row: p's k (whole 128 blocks here)
};
LtOperand lt_operand(const LinearParams& p);

// A dense SwiGLU MLP of a prefill step, x += down(silu(gate x') * up x') with x' = RMSNorm(x) (gu: the
// pair, w2 set; down: accumulate into x), FP8 weights, in one call: the pair's GEMMs write bf16 scratch and
// its SwiGLU goes straight into down's FP8 operand (quantized per 128 columns, zeros past k where k is
// not whole blocks, as V2-Lite's 10,944), so no fp32 rows of the SwiGLU are written and read again.
// False (nothing enqueued that matters) where linear_lt would not take both, or the intermediate width is
// below the hidden size; the caller then runs them with `linear`. DSV3_DENSE_MLP_CODES=0 turns it off
// (read once).
bool linear_lt_mlp(const LinearParams& gu, const LinearParams& down);

// For a grouped gate/up pair whose problems share token rows (x_div > 1) on our FP8 path: the buffers it
// quantizes each token's normed row into once (codes [tokens x k], scales [k / 128][scale_ld = tokens]),
// so that a pass over the same normed rows (the router's, LinearParams::also_fp8) writes them instead;
// the pair then runs with tokens_quantized. No other grouped projection may run on p.stream in between.
// {} where the pair would not quantize its tokens that way.
LtOperand lt_token_operand(const LinearParams& p);

// The same for an expert-grouped projection (gather set, experts with optional experts2 SwiGLU, optional
// norm; no combine or fixed experts) of at least lt_min_rows() problems outside stream capture: per expert
// a cuBLASLt GEMM over its problems (in whole 128 blocks: all experts in one launch of grouped_gemm
// instead, unless DSV3_LT_GROUPED_FP8=0 / DSV3_LT_GROUPED_BF16=0), activations gathered and quantized
// (FP8 per token per 128 columns, or BF16) in one launch. Synchronizes with p.stream once to read
// moe_plan's lists. False: p.y is not written (scratch may have been).
bool linear_lt_grouped(const LinearParams& p);

// The routed experts' MLP of a prefill step in one call: the gate/up pair `gu` (experts2 set) as
// linear_lt_grouped, its SwiGLU written by the pair's epilogue straight into the quantized operand of
// `down` (same plan: gather lists and problems; x_div 1), then `down` as linear_lt_grouped. One read of
// the plan instead of two and no fp32 SwiGLU rows (gu.y is not written); the same bytes in down.y as the
// two calls. False where either call would refuse: down.y and keep are then not written (scratch may
// have been), and the caller runs the projections another way.
//
// `meanwhile`, if given, is called exactly once (also when false is returned), on this thread, to
// enqueue work on gu.stream that neither reads nor writes what these projections use: it runs on the
// device while the host waits for the plan (the one synchronization of this call), instead of after.
//
// With `keep` (and room for them: keep->rows_bytes), the down projection's rows are not copied to
// down.y: its GEMMs write them to keep->rows in their operand order (one wave, no reuse of a scratch)
// and keep->row_of[problem] gives each problem's row; keep->used, bf16 and ld say so and how they are
// stored, for moe_combine (MoeCombineParams::row_of), which then reads the same values it would have
// read from down.y. That saves the copy (a bf16 read and an fp32 write of every problem's row) and
// the combine's fp32 read.
//
// With keep, FP8 experts on our grouped kernel, moe_plan's counts in gu.gather_counts and the expert
// tables' host copies in gu.host_experts / host_experts2 / down.host_experts, the row plan is built on the
// device (moe_rows) and the call never waits for the device (keep->on_device says so); keep->rows then needs
// room for moe_rows_bound(gu.n, table size) rows of bf16 values, ld = down.out rounded up to 8.
// DSV3_MOE_DEVICE_PLAN=0 turns it off.
struct LtRows {
  void* rows = nullptr;
  size_t rows_bytes = 0;
  int32_t* row_of = nullptr;  // [down.n]
  bool used = false, bf16 = false;
  int64_t ld = 0;
  bool on_device = false;
};
bool linear_lt_grouped_mlp(const LinearParams& gu, const LinearParams& down, LtRows* keep = nullptr,
                           const std::function<void()>& meanwhile = {});

}  // namespace dsv3::cuda
