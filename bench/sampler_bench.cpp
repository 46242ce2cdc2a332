// Host time of one Sampler::sample call over a DeepSeek-V2/V3-sized vocabulary (102,400 logits drawn
// from N(0, 3), or from N(0, 0.05) for the "flat" rows: a nearly uniform distribution, as an untrained
// model gives, whose nucleus holds most of the vocabulary), per sampling mode, one thread. Prints a table; results go to docs/PERF.md.
// Usage: dsv3_sampler_bench [VOCAB]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "engine/sampler.h"

int main(int argc, char** argv) {
  using namespace dsv3;
  const int64_t vocab = argc > 1 ? std::atoll(argv[1]) : 102400;
  if (vocab < 2) {
    std::fprintf(stderr, "usage: dsv3_sampler_bench [VOCAB >= 2]\n");
    return 2;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (float& x : logits) x = nd(rng);
  std::normal_distribution<float> narrow(0.0f, 0.05f);
  std::vector<float> flat(static_cast<size_t>(vocab));
  for (float& x : flat) x = narrow(rng);
  struct Mode {
    const char* name;
    SamplingParams p;
    bool flat = false;
  };
  std::vector<Mode> modes(7);
  modes[0].name = "greedy";
  modes[1].name = "temperature 1";
  modes[1].p.temperature = 1.0;
  modes[2].name = "temperature 0.7, top_p 0.9";
  modes[2].p.temperature = 0.7;
  modes[2].p.top_p = 0.9;
  modes[3].name = "temperature 0.7, top_k 50";
  modes[3].p.temperature = 0.7;
  modes[3].p.top_k = 50;
  modes[4].name = "greedy + 5 top logprobs";
  modes[4].p.top_logprobs = 5;
  modes[5].name = "flat, temperature 0.8, top_p 0.95";
  modes[5].p.temperature = 0.8;
  modes[5].p.top_p = 0.95;
  modes[5].flat = true;
  modes[6].name = "flat, temperature 0.8, top_k 40000";
  modes[6].p.temperature = 0.8;
  modes[6].p.top_k = 40000;
  modes[6].flat = true;
  std::printf("| mode (vocabulary %lld) | ms per token | tokens/s, one thread |\n|---|---:|---:|\n",
              static_cast<long long>(vocab));
  for (const Mode& m : modes) {
    const float* row = m.flat ? flat.data() : logits.data();
    Sampler s(m.p);
    s.sample(row, vocab);  // warm-up (scratch buffers)
    int iters = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double sec = 0.0;
    int64_t sink = 0;
    while (sec < 0.5) {
      sink += s.sample(row, vocab);
      ++iters;
      sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    std::printf("| %s | %.3f | %.0f |\n", m.name, 1e3 * sec / iters, iters / sec);
    if (sink < 0) std::printf("(unreachable)\n");
  }
  return 0;
}
