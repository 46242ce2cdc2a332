// The paged latent cache: the block pool (allocation, reference counts, exhaustion), block tables over
// a shared pool, the prefix cache (verified hits, LRU eviction of unreferenced blocks) and the disk tier
// (round trips, restarts, bad files dropped and counted, the size cap, atomic writes).
#include <algorithm>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <numeric>

#include "core/error.h"
#include "kvcache/block_hash.h"
#include "kvcache/disk_cache.h"
#include "kvcache/latent_cache.h"
#include "kvcache/prefix_cache.h"
#include "test_util.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kLayers = 2, kLatent = 6, kRope = 2, kWidth = kLatent + kRope;

std::vector<int32_t> block_of(int32_t first) {
  std::vector<int32_t> t(BlockPool::kBlockTokens);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::vector<float> rows_of(float seed) {
  std::vector<float> r(static_cast<size_t>(kLayers * BlockPool::kBlockTokens * kWidth));
  for (size_t i = 0; i < r.size(); ++i) r[i] = seed + 0.001f * static_cast<float>(i);
  return r;
}

std::vector<std::string> files_in(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST(BlockPool, AllocatesEveryBlockOnceThenRunsOut) {
  BlockPool pool(kLayers, kLatent, kRope, 3);
  EXPECT_EQ(pool.total_blocks(), 3);
  EXPECT_EQ(pool.block_floats(), kLayers * 64 * kWidth);
  std::vector<int32_t> got;
  for (int i = 0; i < 3; ++i) got.push_back(pool.allocate());
  EXPECT_EQ(pool.allocate(), BlockPool::kNoBlock);
  EXPECT_EQ(pool.free_blocks(), 0);
  std::sort(got.begin(), got.end());
  EXPECT_EQ(got, (std::vector<int32_t>{0, 1, 2}));
  // Distinct blocks do not overlap.
  EXPECT_EQ(pool.data(1) - pool.data(0), pool.block_floats());
  pool.release(got[1]);
  EXPECT_EQ(pool.free_blocks(), 1);
  EXPECT_EQ(pool.allocate(), got[1]);
}

TEST(BlockPool, ReferenceCountsKeepSharedBlocks) {
  BlockPool pool(kLayers, kLatent, kRope, 2);
  const int32_t b = pool.allocate();
  pool.retain(b);
  EXPECT_EQ(pool.refs(b), 2);
  pool.release(b);
  EXPECT_EQ(pool.free_blocks(), 1);  // still held once
  pool.release(b);
  EXPECT_EQ(pool.free_blocks(), 2);
}

TEST(BlockPool, SizedFromAByteBudget) {
  const int64_t block_bytes = kLayers * 64 * kWidth * 4;
  EXPECT_EQ(BlockPool::blocks_for_bytes(10 * block_bytes + 5, kLayers, kLatent, kRope), 10);
  EXPECT_EQ(BlockPool::blocks_for_bytes(block_bytes - 1, kLayers, kLatent, kRope), 0);
  EXPECT_EQ(BlockPool::blocks_for_tokens(64), 1);
  EXPECT_EQ(BlockPool::blocks_for_tokens(65), 2);
  EXPECT_THROW(BlockPool(kLayers, kLatent, kRope, 0), Error);
}

// A storage the CPU may not address directly (as device memory): only whole-block copies reach it.
class OpaqueStorage final : public BlockStorage {
 public:
  explicit OpaqueStorage(int64_t floats) : mem_(static_cast<size_t>(floats), 0.0f) {}
  float* base() override { return mem_.data(); }
  bool host_addressable() const override { return false; }
  void copy_to_host(int32_t block, int64_t n, float* dst) const override {
    std::copy_n(mem_.data() + block * n, n, dst);
  }
  void copy_from_host(int32_t block, int64_t n, const float* src) override {
    std::copy_n(src, n, mem_.data() + block * n);
  }
  std::vector<float> mem_;
};

TEST(BlockPool, CallerStorageIsReachedThroughBlockCopies) {
  const int64_t block_floats = kLayers * 64 * kWidth;
  auto storage = std::make_unique<OpaqueStorage>(3 * block_floats);
  OpaqueStorage* raw = storage.get();
  BlockPool pool(kLayers, kLatent, kRope, 3, std::move(storage));
  EXPECT_FALSE(pool.on_host());
  EXPECT_EQ(pool.block_address(2), raw->mem_.data() + 2 * block_floats);
  std::vector<float> in(static_cast<size_t>(block_floats)), out(in.size());
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 977) * 0.5f;
  pool.copy_from_host(1, in.data());
  EXPECT_EQ(raw->mem_[static_cast<size_t>(block_floats)], in[0]);
  EXPECT_EQ(raw->mem_[0], 0.0f);  // block 0 untouched
  pool.copy_to_host(1, out.data());
  EXPECT_EQ(in, out);
}

TEST(LatentCache, BlockTablesShareOnePool) {
  auto pool = std::make_shared<BlockPool>(kLayers, kLatent, kRope, 5);
  LatentCache a(pool, 1000), b(pool, 1000);
  a.reserve(100);  // 2 blocks
  a.advance(100);
  b.reserve(64);   // 1 block
  b.advance(64);
  EXPECT_EQ(a.blocks().size(), 2u);
  EXPECT_EQ(b.blocks().size(), 1u);
  EXPECT_EQ(pool->free_blocks(), 2);
  // Rows of different sequences and positions are different memory; positions map through the table.
  EXPECT_NE(a.row(0, 5), b.row(0, 5));
  EXPECT_EQ(a.row(1, 70), pool->row(a.blocks()[1], 1, 6));
  EXPECT_EQ(a.blocks_needed(28), 0);
  EXPECT_EQ(a.blocks_needed(29), 1);
  // Exhaustion is a clear error, not a crash; nothing is taken.
  try {
    a.reserve(28 + 3 * 64);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("out of blocks"), std::string::npos) << e.what();
  }
  EXPECT_EQ(pool->free_blocks(), 2);
  a.truncate(10);  // back to one block
  EXPECT_EQ(pool->free_blocks(), 3);
  // A shared block: b's first block appended to a fresh cache; freed only when both let go.
  {
    LatentCache c(pool, 1000);
    c.append_shared_block(b.blocks()[0]);
    EXPECT_EQ(c.length(), 64);
    EXPECT_EQ(c.row(0, 3), b.row(0, 3));
    EXPECT_EQ(pool->refs(b.blocks()[0]), 2);
  }
  EXPECT_EQ(pool->refs(b.blocks()[0]), 1);
  { LatentCache moved = std::move(b); }
  EXPECT_EQ(pool->free_blocks(), 4);
}

TEST(LatentCache, StandaloneCacheHonoursItsLimit) {
  LatentCache c(kLayers, kLatent, kRope, 100);
  c.reserve(100);
  c.advance(100);
  EXPECT_THROW(c.reserve(1), Error);
  EXPECT_EQ(c.length(), 100);
}

TEST(PrefixCache, HitsAreVerifiedAndCounted) {
  BlockPool pool(kLayers, kLatent, kRope, 4);
  PrefixCache cache(pool);
  const auto t0 = block_of(0), t1 = block_of(100);
  const uint64_t h0 = chain_hash(7, t0), h1 = chain_hash(h0, t1);
  EXPECT_NE(chain_hash(8, t0), h0);  // the parent is part of the name
  const int32_t b0 = pool.allocate(), b1 = pool.allocate();
  EXPECT_TRUE(cache.insert(h0, 7, t0, b0, 0));
  EXPECT_TRUE(cache.insert(h1, h0, t1, b1, 1));
  EXPECT_FALSE(cache.insert(h1, h0, t1, b1, 1));  // already there: no second reference
  EXPECT_EQ(pool.refs(b1), 2);
  EXPECT_EQ(cache.find(h0, 7, t0), b0);
  EXPECT_EQ(cache.find(h1, h0, t1), b1);
  // Same hash, other tokens or parent (a collision): a miss.
  EXPECT_EQ(cache.find(h1, h0, t0), BlockPool::kNoBlock);
  EXPECT_EQ(cache.find(h1, 7, t1), BlockPool::kNoBlock);
  EXPECT_EQ(cache.reclaimable(), 0);  // the sequences still hold both
  pool.release(b0);
  pool.release(b1);
  EXPECT_EQ(cache.reclaimable(), 2);
  EXPECT_EQ(pool.free_blocks(), 2);
}

TEST(PrefixCache, EvictsLeastRecentlyUsedUnreferencedBlocks) {
  BlockPool pool(kLayers, kLatent, kRope, 3);
  PrefixCache cache(pool);
  std::vector<uint64_t> hashes;
  std::vector<int32_t> blocks;
  for (int i = 0; i < 3; ++i) {
    const auto t = block_of(i * 64);
    hashes.push_back(chain_hash(0, t));
    blocks.push_back(pool.allocate());
    cache.insert(hashes.back(), 0, t, blocks.back(), 0);
    cache.tick();
  }
  pool.release(blocks[0]);
  pool.release(blocks[1]);  // blocks[2] stays held by a sequence
  cache.find(hashes[0], 0, block_of(0));  // 0 is now more recent than 1
  std::vector<uint64_t> dropped;
  auto record = [&](const PrefixCache::Entry& e) { dropped.push_back(e.hash); };
  EXPECT_TRUE(cache.evict_one(record));
  EXPECT_TRUE(cache.evict_one(record));
  EXPECT_FALSE(cache.evict_one(record));  // only the held block is left
  EXPECT_EQ(dropped, (std::vector<uint64_t>{hashes[1], hashes[0]}));
  EXPECT_EQ(pool.free_blocks(), 2);
  EXPECT_EQ(cache.size(), 1);
  pool.release(blocks[2]);
}

TEST(PrefixCache, AChainUsedAtOnceLosesItsTailFirst) {
  BlockPool pool(kLayers, kLatent, kRope, 3);
  PrefixCache cache(pool);
  uint64_t parent = 0;
  std::vector<uint64_t> chain;
  for (int64_t d = 0; d < 3; ++d) {
    const auto t = block_of(static_cast<int32_t>(d * 64));
    chain.push_back(chain_hash(parent, t));
    const int32_t b = pool.allocate();
    cache.insert(chain.back(), parent, t, b, d);
    pool.release(b);
    parent = chain.back();
    cache.tick();  // entered over three steps: the head is the oldest
  }
  for (uint64_t h : chain) cache.touch(h);  // the sequence finished: the whole chain used now
  std::vector<uint64_t> dropped;
  while (cache.evict_one([&](const PrefixCache::Entry& e) { dropped.push_back(e.hash); })) {}
  EXPECT_EQ(dropped, (std::vector<uint64_t>{chain[2], chain[1], chain[0]}));
}

class DiskCacheTest : public ::testing::Test {
 protected:
  DiskCache open(int64_t cap = 0, uint64_t model = 42) { return DiskCache(dir_.path(), cap, model, kLayers, kWidth); }
  test::TempDir dir_;
  const std::vector<int32_t> t0_ = block_of(0), t1_ = block_of(64), t2_ = block_of(128);
  const uint64_t h0_ = chain_hash(42, t0_), h1_ = chain_hash(h0_, t1_), h2_ = chain_hash(h1_, t2_);
};

TEST_F(DiskCacheTest, RoundTripAndRestart) {
  const auto rows = rows_of(1.0f);
  {
    DiskCache d = open();
    EXPECT_TRUE(d.enabled());
    d.write(h0_, 42, 0, t0_, rows.data());
    d.write(h0_, 42, 0, t0_, rows.data());  // already there
    EXPECT_EQ(d.stats().writes, 1);
    EXPECT_EQ(files_in(dir_.path()), std::vector<std::string>{DiskCache::file_name(h0_)});
    EXPECT_EQ(static_cast<int64_t>(fs::file_size(dir_ / DiskCache::file_name(h0_))), d.file_bytes());
  }
  DiskCache d = open();  // a restart
  EXPECT_TRUE(d.contains(h0_));
  EXPECT_FALSE(d.contains(h1_));
  std::vector<float> back(rows.size());
  EXPECT_TRUE(d.read(h0_, 42, t0_, back.data()));
  EXPECT_EQ(back, rows);
  // Asked for under another parent or other tokens: not used, and the file is treated as bad.
  EXPECT_FALSE(d.read(h0_, 43, t0_, back.data()));
  EXPECT_EQ(d.stats().corrupt_dropped, 1);
  EXPECT_FALSE(d.contains(h0_));
  EXPECT_TRUE(files_in(dir_.path()).empty());
}

TEST_F(DiskCacheTest, CorruptTruncatedAndForeignFilesAreDroppedAndCounted) {
  const auto rows = rows_of(2.0f);
  {
    DiskCache d = open();
    d.write(h0_, 42, 0, t0_, rows.data());
    d.write(h1_, h0_, 1, t1_, rows.data());
    d.write(h2_, h1_, 2, t2_, rows.data());
  }
  {
    DiskCache other = DiskCache(dir_.path() + "/other", 0, 99, kLayers, kWidth);
    other.write(h0_, 42, 0, t0_, rows.data());
  }
  // Flip one payload byte of block 1, cut block 2 short, and put another model's file in as block 0.
  std::string f1 = test::read_file(dir_ / DiskCache::file_name(h1_));
  f1[f1.size() - 10] ^= 0x40;
  test::write_file(dir_ / DiskCache::file_name(h1_), f1);
  const std::string f2 = test::read_file(dir_ / DiskCache::file_name(h2_));
  test::write_file(dir_ / DiskCache::file_name(h2_), f2.substr(0, f2.size() - 100));
  fs::rename(dir_ / ("other/" + DiskCache::file_name(h0_)), dir_ / DiskCache::file_name(h0_));

  DiskCache d = open();
  // The truncated and the foreign file fail the header/size check at startup.
  EXPECT_EQ(d.stats().corrupt_dropped, 2);
  EXPECT_FALSE(d.contains(h0_));
  EXPECT_FALSE(d.contains(h2_));
  // The flipped byte passes the header check but not the checksum.
  ASSERT_TRUE(d.contains(h1_));
  std::vector<float> back(rows.size());
  EXPECT_FALSE(d.read(h1_, h0_, t1_, back.data()));
  EXPECT_EQ(d.stats().corrupt_dropped, 3);
  EXPECT_EQ(d.stats().hits, 0);
  EXPECT_EQ(files_in(dir_.path()), std::vector<std::string>{"other"});
}

TEST_F(DiskCacheTest, SizeCapDeletesLeastRecentlyUsed) {
  const auto rows = rows_of(3.0f);
  const int64_t one = open().file_bytes();
  DiskCache d = open(2 * one + 10);
  d.write(h0_, 42, 0, t0_, rows.data());
  d.write(h1_, h0_, 1, t1_, rows.data());
  d.tick();
  std::vector<float> back(rows.size());
  EXPECT_TRUE(d.read(h0_, 42, t0_, back.data()));  // h0 is now more recent than h1
  d.tick();
  d.write(h2_, h1_, 2, t2_, rows.data());
  EXPECT_TRUE(d.contains(h0_));
  EXPECT_FALSE(d.contains(h1_));
  EXPECT_TRUE(d.contains(h2_));
  EXPECT_EQ(d.stats().bytes, 2 * one);
  EXPECT_EQ(files_in(dir_.path()).size(), 2u);
  // A restart with a smaller cap trims to it: equally old now, so the deeper block goes.
  DiskCache small = open(one);
  EXPECT_EQ(small.stats().files, 1);
  EXPECT_TRUE(small.contains(h0_));
  EXPECT_EQ(files_in(dir_.path()).size(), 1u);
}

TEST_F(DiskCacheTest, AChainWrittenAtOnceLosesItsTailFirst) {
  const auto rows = rows_of(3.5f);
  DiskCache d = open(2 * open().file_bytes());
  d.write(h0_, 42, 0, t0_, rows.data());
  d.write(h1_, h0_, 1, t1_, rows.data());
  d.write(h2_, h1_, 2, t2_, rows.data());  // over the cap: the tail itself goes, the head stays
  EXPECT_TRUE(d.contains(h0_));
  EXPECT_TRUE(d.contains(h1_));
  EXPECT_FALSE(d.contains(h2_));
  EXPECT_EQ(d.stats().writes, 3);
}

TEST_F(DiskCacheTest, LeftoverTempFilesAreRemovedAndNoneAreLeft) {
  test::write_file(dir_ / "0000000000000001.kvb.123.tmp", "partial");
  test::write_file(dir_ / "notes.txt", "not ours");
  DiskCache d = open();
  const auto rows = rows_of(4.0f);
  d.write(h0_, 42, 0, t0_, rows.data());
  EXPECT_EQ(files_in(dir_.path()), (std::vector<std::string>{DiskCache::file_name(h0_), "notes.txt"}));
  EXPECT_EQ(d.stats().corrupt_dropped, 0);
}

TEST_F(DiskCacheTest, UnusableDirectoryTurnsTheTierOff) {
  test::write_file(dir_ / "file", "x");
  DiskCache d(dir_ / "file", 0, 42, kLayers, kWidth);  // a file where the directory should be
  EXPECT_FALSE(d.enabled());
  const auto rows = rows_of(5.0f);
  d.write(h0_, 42, 0, t0_, rows.data());  // ignored, no throw
  EXPECT_FALSE(d.contains(h0_));
  EXPECT_EQ(d.stats().writes, 0);
}

TEST_F(DiskCacheTest, AWriteFailureWarnsOnceAndTurnsTheTierOff) {
  DiskCache d = open();
  // A directory where the temp file must go: the write fails (as on a read-only or full disk, and
  // also for root, whom permissions do not stop).
  const std::string blocker = dir_ / (DiskCache::file_name(h0_) + "." + std::to_string(::getpid()) + ".tmp");
  fs::create_directory(blocker);
  test::write_file(blocker + "/x", "keeps the directory non-empty");
  const auto rows = rows_of(6.0f);
  d.write(h0_, 42, 0, t0_, rows.data());  // fails: one warning, the tier turns off, nothing thrown
  EXPECT_FALSE(d.enabled());
  d.write(h1_, h0_, 1, t1_, rows.data());  // not even tried
  EXPECT_EQ(d.stats().writes, 0);
  EXPECT_EQ(files_in(dir_.path()), std::vector<std::string>{fs::path(blocker).filename().string()});
}

}  // namespace dsv3
