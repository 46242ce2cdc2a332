// dsv3 quantize: converts a BF16/F16/F32 checkpoint to DeepSeek's FP8 layout (model/quantize.h).
// dsv3 perplexity: held-out perplexity of a model over a token file, to measure what a conversion costs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <span>
#include <vector>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "model/model.h"
#include "model/quantize.h"
#include "train/data.h"

namespace dsv3::cli {

int cmd_quantize(const Argv& argv) {
  Args args("quantize", "Writes an FP8 copy of a BF16/F16/F32 checkpoint: projections as FP8 e4m3 with one scale\n"
                        "per 128x128 block (DeepSeek-V3's layout); embeddings, heads, router and norms unchanged.",
            {model_flag(),
             {"out", "DIR", "output directory (created)"},
             {"keep-mtp-copies", "", "keep the MTP layer's copies of the embedding and head (default: share)"}});
  if (!args.parse(argv)) return 0;
  QuantizeOptions opt;
  opt.share_mtp_embeddings = !args.has("keep-mtp-copies");
  const std::string out = args.required("out");
  const QuantizeReport r = quantize_checkpoint(model_dir(args), out, opt);
  std::printf("wrote %s: %lld tensors (%lld FP8), %lld shared MTP copies left out, %.1f MB -> %.1f MB, "
              "largest rounding error %.3g of a block's amax\n",
              out.c_str(), static_cast<long long>(r.tensors), static_cast<long long>(r.fp8_tensors),
              static_cast<long long>(r.shared_dropped), r.bytes_in / 1e6, r.bytes_out / 1e6, r.max_rel_error);
  return 0;
}

int cmd_perplexity(const Argv& argv) {
  Args args("perplexity", "Perplexity of the model over a token file (uint32 ids, e.g. from tokenize-corpus), in\n"
                          "consecutive windows of --ctx tokens; each window's first token is context only.",
            {model_flag(),
             {"data", "FILE", "little-endian uint32 token ids (.u32)"},
             {"ctx", "N", "window length (default 512)"},
             {"max-windows", "N", "stop after N windows (default: all)"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  apply_threads(args);
  Model model(model_dir(args));
  const int64_t ctx = args.integer("ctx", 512, 2, 1 << 20);
  const int64_t max_windows = args.integer("max-windows", INT64_MAX, 1, INT64_MAX);
  const std::vector<int32_t> tokens =
      train::load_tokens(args.required("data"), train::DataFormat::U32, 0, model.config().vocab_size);
  const int64_t V = model.config().vocab_size;
  check(static_cast<int64_t>(tokens.size()) >= 2, "the data file holds fewer than 2 tokens");
  double nll = 0;
  int64_t counted = 0, windows = 0;
  for (size_t at = 0; at + 1 < tokens.size() && windows < max_windows; at += static_cast<size_t>(ctx), ++windows) {
    const size_t n = std::min(tokens.size() - at, static_cast<size_t>(ctx));
    if (n < 2) break;
    std::span<const int32_t> w(tokens.data() + at, n);
    LatentCache cache = model.new_cache(static_cast<int64_t>(n));
    const std::vector<float> logits = model.forward(w, cache);
    for (size_t t = 0; t + 1 < n; ++t) {
      const float* row = logits.data() + t * static_cast<size_t>(V);
      const float m = *std::max_element(row, row + V);
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(row[v] - m));
      nll += std::log(sum) + m - row[w[t + 1]];
      ++counted;
    }
  }
  std::printf("windows %lld  tokens scored %lld  mean NLL %.4f  perplexity %.3f\n", static_cast<long long>(windows),
              static_cast<long long>(counted), nll / static_cast<double>(counted),
              std::exp(nll / static_cast<double>(counted)));
  return 0;
}

}  // namespace dsv3::cli
