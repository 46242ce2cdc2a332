// splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014;
// constants as in Vigna's public-domain splitmix64.c): the project's one small, platform-independent
// generator, used wherever a result must be the same on every machine and standard library (random
// checkpoints, the trainer's initialization, data shuffles and corpus splits) and, as a bit mixer, by
// the prefix cache's hashes.
#pragma once

#include <cstdint>

namespace dsv3 {

// The generator's increment: 2^64 divided by the golden ratio, odd.
inline constexpr uint64_t kSplitMix64Gamma = 0x9e3779b97f4a7c15ull;

// The finalizer: every input bit reaches every output bit.
inline uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct SplitMix64 {
  uint64_t state;
  uint64_t next() { return splitmix64_mix(state += kSplitMix64Gamma); }
  uint64_t below(uint64_t n) { return next() % n; }                          // 0 .. n-1 (modulo bias: n is small)
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1), 53 random bits
};

}  // namespace dsv3
