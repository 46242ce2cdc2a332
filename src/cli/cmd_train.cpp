// dsv3 train: trains a DeepSeek-V3-architecture model on the CPU or one GPU from a config (a config.json with a
// "training" section, docs/TRAINING.md) and a token file, writing Hugging Face-layout checkpoints that
// every other dsv3 command loads.
#include <cstdio>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "core/json.h"
#include "train/data.h"
#include "train/trainer.h"
#ifdef DSV3_HAVE_CUDA
#include "train/cuda/cuda_train_model.h"
#endif

namespace dsv3::cli {

int cmd_train(const Argv& argv) {
  Args args("train",
            "Trains a DeepSeek-V3-architecture model (MLA, MoE with auxiliary-loss-free balancing, MTP) on "
            "the CPU or one NVIDIA GPU (--device cuda).\n"
            "--config is a DeepSeek-V3 config.json with a \"training\" section (see docs/TRAINING.md and\n"
            "train/configs/). Data: uint32 token ids (.u32/.bin/.tokens) or text read byte-level.",
            {{"config", "FILE", "model config.json plus a \"training\" section"},
             {"data", "FILE", "training tokens: uint32 file, or text (ids = bytes + training.byte_offset)"},
             {"eval-data", "FILE", "held-out tokens for the eval loss (default: the tail of --data)"},
             {"data-format", "FORMAT", "auto (by extension), u32 or bytes"},
             {"out", "DIR", "checkpoint directory (config.json, model.safetensors, optimizer state)"},
             {"resume", "DIR", "continue from a checkpoint written by dsv3 train"},
             {"init", "DIR", "start from the weights of a checkpoint (any dtype but FP8), at step 0"},
             {"steps", "N", "override training.steps"},
             {"device", "cpu", "where to train: cpu (default) or cuda (one NVIDIA GPU, if built with CUDA)"},
             {"precision", "bf16", "GEMMs on cuda: bf16 (tensor cores, fp32 accumulation; default) or fp32"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  apply_threads(args);
  const std::string device = args.str("device", "cpu");
  check_device(device);
  check(device == "cuda" || !args.has("precision"), "--precision applies to --device cuda only",
        "the CPU trainer always computes in fp32");
  const std::string config_path = args.required("config");
  Json config = read_json_file(config_path);
  check(config.is_object(), config_path + ": expected a JSON object");
  if (args.has("steps")) {
    if (!config.contains("training") || config["training"].is_null()) config["training"] = Json::object();
    config["training"]["steps"] = args.integer("steps", 0, 0, int64_t{1} << 40);
  }
  const ModelConfig model_cfg = ModelConfig::from_json(config, config_path);
  const train::TrainConfig train_cfg = train::TrainConfig::from_json(config, config_path, model_cfg);
  const train::DataFormat format = train::parse_data_format(args.str("data-format", "auto"));

  std::vector<int32_t> data =
      train::load_tokens(args.required("data"), format, train_cfg.byte_offset, model_cfg.vocab_size);
  std::vector<int32_t> eval;
  if (args.has("eval-data"))
    eval = train::load_tokens(args.str("eval-data"), format, train_cfg.byte_offset, model_cfg.vocab_size);

  train::Trainer trainer(config, config_path, std::move(data), std::move(eval));
#ifdef DSV3_HAVE_CUDA
  if (device == "cuda") {
    const train::cuda::Precision precision = train::cuda::parse_precision(args.str("precision", "bf16"));
    const train::TrainConfig& c = trainer.config();
    trainer.set_backend(std::make_unique<train::cuda::CudaTrainModel>(
        trainer.model(), trainer.optimizer(), train::AdamWConfig{c.beta1, c.beta2, c.eps, c.weight_decay},
        precision));
  }
#endif
  check(!(args.has("resume") && args.has("init")), "--resume and --init exclude each other",
        "--resume continues a run (weights, optimizer, step); --init only takes the weights");
  if (args.has("init")) trainer.load_weights(args.str("init"));
  if (args.has("resume")) {
    trainer.resume(args.str("resume"));
    std::printf("resumed from %s at step %lld\n", args.str("resume").c_str(),
                static_cast<long long>(trainer.step_count()));
  }
  trainer.run(args.str("out"), stdout);
  return 0;
}

}  // namespace dsv3::cli
