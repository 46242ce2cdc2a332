// dsv3 logits: teacher-forced logits of every position, little-endian float32 [n_tokens x vocab].
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "model/model.h"
#ifdef DSV3_HAVE_CUDA
#include "model/cuda_model.h"
#endif

namespace dsv3::cli {

static_assert(std::endian::native == std::endian::little, "logits files are written as little-endian float32");

namespace {

// Model (CPU) and CudaModel share new_cache/forward, so one body serves both devices.
template <class Engine>
std::vector<float> teacher_forced_logits(Engine& model, const std::vector<int32_t>& tokens, const ForwardOptions& opt) {
  auto cache = model.new_cache(static_cast<int64_t>(tokens.size()));
  return model.forward(tokens, cache, opt);
}

}  // namespace

int cmd_logits(const Argv& argv) {
  Args args("logits", "Runs the model teacher-forced over --tokens and writes the logits of every position as\n"
                      "little-endian float32, row-major [n_tokens x vocab_size].",
            {model_flag(),
             {"tokens", "IDS", "comma-separated token ids, e.g. 5,17,42"},
             {"out", "FILE", "output file"},
             {"device", "cpu", "where to run: cpu (default) or cuda (one NVIDIA GPU, if built with CUDA)"},
             {"attention", "FORM", "auto, expanded or absorbed (how MLA uses the latent cache)"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  const std::vector<int32_t> tokens = args.int_list("tokens");
  const std::string out = args.required("out");
  const std::string device = args.str("device", "cpu");
  check_device(device);
  const std::string form_name = args.str("attention", "auto");
  AttentionForm form = AttentionForm::Auto;
  if (form_name == "expanded") form = AttentionForm::Expanded;
  else if (form_name == "absorbed") form = AttentionForm::Absorbed;
  else check(form_name == "auto", "--attention must be auto, expanded or absorbed, got '" + form_name + "'");
  apply_threads(args);

  Model model(model_dir(args));
  ForwardOptions opt;
  opt.attention = form;
  std::vector<float> logits;
  if (device == "cuda") {
#ifdef DSV3_HAVE_CUDA
    CudaModel gpu(model);
    logits = teacher_forced_logits(gpu, tokens, opt);
#endif
  } else {
    logits = teacher_forced_logits(model, tokens, opt);
  }

  FILE* f = std::fopen(out.c_str(), "wb");
  check(f != nullptr, "cannot write " + out + ": " + std::strerror(errno));
  const size_t written = std::fwrite(logits.data(), sizeof(float), logits.size(), f);
  const bool ok = written == logits.size() && std::fclose(f) == 0;
  check(ok, "failed writing " + out + ": " + std::strerror(errno), "check free disk space");
  return 0;
}

}  // namespace dsv3::cli
