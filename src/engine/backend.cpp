#include "engine/backend.h"

#include <algorithm>
#include <cstdio>
#include <memory>
#include <span>
#include <vector>

#include "core/error.h"
#include "kvcache/latent_cache.h"

namespace dsv3 {

#ifdef DSV3_HAVE_CUDA
// engine/backend_cuda.cpp, built only with DSV3_CUDA.
std::unique_ptr<Backend> make_cuda_backend(Model& host);
#endif

namespace {

std::string gigabytes(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GB", static_cast<double>(bytes) / 1e9);
  return buf;
}

}  // namespace

int64_t Backend::block_bytes() const {
  const ModelConfig& cfg = config();
  return cfg.num_hidden_layers * BlockPool::kBlockTokens * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) *
         static_cast<int64_t>(sizeof(float));
}

std::shared_ptr<BlockPool> CpuBackend::new_pool(int64_t n_blocks) const {
  const ModelConfig& cfg = config();
  return std::make_shared<BlockPool>(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, n_blocks);
}

bool cuda_backend_available() {
#ifdef DSV3_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& device, Model& host) {
  if (device == "cpu") return std::make_unique<CpuBackend>(host);
  check(device == "cuda", "unknown device '" + device + "'", "use cpu or cuda");
#ifdef DSV3_HAVE_CUDA
  return make_cuda_backend(host);
#else
  throw Error("--device cuda is not available: this dsv3 was built without CUDA",
              "rebuild with -DDSV3_CUDA=ON on a machine with the CUDA toolkit (nvcc), or use --device cpu");
#endif
}

int64_t pool_blocks(const Backend& backend, int64_t memory_bytes, int64_t cache_blocks, int64_t ctx) {
  const int64_t per_block = backend.block_bytes();
  const std::optional<int64_t> free = backend.free_memory_bytes();
  int64_t blocks = cache_blocks;
  std::string source = "--cache-blocks " + std::to_string(cache_blocks);
  if (memory_bytes > 0) {
    check(!free || memory_bytes <= *free,
          "--cache-memory-gb asks for " + gigabytes(memory_bytes) + " of cache, but " + backend.device_name() +
              " has only " + gigabytes(free.value_or(0)) + " free after loading the model",
          "ask for less, or leave --cache-memory-gb out to take " +
              std::to_string(static_cast<int>(kDefaultDeviceCacheFraction * 100)) + "% of the free memory");
    blocks = memory_bytes / per_block;
    source = "--cache-memory-gb (" + gigabytes(memory_bytes) + ")";
  } else if (free && cache_blocks == 0) {
    blocks = static_cast<int64_t>(kDefaultDeviceCacheFraction * static_cast<double>(*free)) / per_block;
    source = std::to_string(static_cast<int>(kDefaultDeviceCacheFraction * 100)) + "% of the " + gigabytes(*free) +
             " free on " + backend.device_name();
  } else if (free) {
    check(cache_blocks * per_block <= *free,
          "--cache-blocks " + std::to_string(cache_blocks) + " needs " + gigabytes(cache_blocks * per_block) +
              ", but " + backend.device_name() + " has only " + gigabytes(*free) + " free after loading the model",
          "give fewer blocks, or leave --cache-blocks out");
  }
  if (blocks == 0) return 0;  // host default: the Scheduler sizes it from max_batch and ctx
  const int64_t one_ctx = BlockPool::blocks_for_tokens(ctx);
  check(blocks >= one_ctx,
        "the latent cache from " + source + " holds " + std::to_string(blocks) + " blocks of " +
            std::to_string(BlockPool::kBlockTokens) + " tokens (" + gigabytes(per_block) + " each), fewer than the " +
            std::to_string(one_ctx) + " one request of --ctx " + std::to_string(ctx) + " tokens needs",
        "give the cache more memory or lower --ctx");
  return blocks;
}

void warm_up(Backend& backend, int64_t step_tokens, int64_t ctx) {
  check(step_tokens >= 1 && ctx >= 1, "warm_up needs a step of at least one token and a context of at least one");
  const int64_t vocab = backend.config().vocab_size;
  const int64_t longest = std::min(step_tokens, ctx), piece = std::min<int64_t>(512, longest);
  std::vector<int32_t> ids(static_cast<size_t>(longest));
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(static_cast<int64_t>(i) % vocab);
  const int64_t pieces = (step_tokens + piece - 1) / piece;
  std::shared_ptr<BlockPool> pool = backend.new_pool(BlockPool::blocks_for_tokens(longest) +
                                                     pieces * BlockPool::blocks_for_tokens(piece));
  {
    LatentCache cache(pool, longest);
    const Model::BatchItem item{ids, &cache, false};
    backend.forward_batch(std::span(&item, 1));
  }
  std::vector<LatentCache> caches;
  std::vector<Model::BatchItem> items;
  caches.reserve(static_cast<size_t>(pieces));
  for (int64_t i = 0, left = step_tokens; i < pieces; ++i, left -= piece) {
    caches.emplace_back(pool, piece);
    items.push_back({std::span(ids.data(), static_cast<size_t>(std::min(piece, left))), &caches.back(), false});
  }
  backend.forward_batch(items);
}

}  // namespace dsv3
