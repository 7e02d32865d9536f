// Unit tests for cache/bitmap.hpp: AtomicBitmap.
#include "cache/bitmap.hpp"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace blockway::cache {
namespace {

TEST(AtomicBitmap, StartsClearAndReportsSize) {
  AtomicBitmap b(130);
  EXPECT_EQ(b.size(), 130u);
  EXPECT_EQ(b.word_count(), 3u);
  EXPECT_EQ(b.count(), 0u);
  EXPECT_EQ(b.find_set(0), 130u);
  EXPECT_FALSE(b.any_set(0, 129));
}

TEST(AtomicBitmap, SetAndClearReturnPreviousValue) {
  AtomicBitmap b(100);
  EXPECT_FALSE(b.set(5));
  EXPECT_TRUE(b.set(5));
  EXPECT_TRUE(b.test(5));
  EXPECT_FALSE(b.test(4));
  EXPECT_TRUE(b.clear(5));
  EXPECT_FALSE(b.clear(5));
  EXPECT_FALSE(b.test(5));
}

TEST(AtomicBitmap, AllSetAcrossWordBoundaries) {
  AtomicBitmap b(200);
  for (uint64_t i = 60; i <= 140; ++i) b.set(i);
  EXPECT_TRUE(b.all_set(60, 140));
  EXPECT_TRUE(b.all_set(64, 127));
  EXPECT_TRUE(b.all_set(100, 100));
  EXPECT_FALSE(b.all_set(59, 140));
  EXPECT_FALSE(b.all_set(60, 141));
  b.clear(128);
  EXPECT_FALSE(b.all_set(60, 140));
  EXPECT_TRUE(b.all_set(60, 127));
}

TEST(AtomicBitmap, AllSetOfAWholeLastWord) {
  AtomicBitmap b(128);
  for (uint64_t i = 64; i < 128; ++i) b.set(i);
  EXPECT_TRUE(b.all_set(64, 127));
  EXPECT_TRUE(b.all_set(127, 127));
  EXPECT_FALSE(b.all_set(63, 127));
}

TEST(AtomicBitmap, AnySetFindsSingleBits) {
  AtomicBitmap b(300);
  EXPECT_FALSE(b.any_set(0, 299));
  b.set(257);
  EXPECT_TRUE(b.any_set(0, 299));
  EXPECT_TRUE(b.any_set(257, 257));
  EXPECT_TRUE(b.any_set(200, 258));
  EXPECT_FALSE(b.any_set(0, 256));
  EXPECT_FALSE(b.any_set(258, 299));
  b.set(3);
  EXPECT_TRUE(b.any_set(0, 63));
  EXPECT_TRUE(b.any_set(3, 3));
  EXPECT_FALSE(b.any_set(4, 256));
}

TEST(AtomicBitmap, FindSet) {
  AtomicBitmap b(200);
  b.set(0);
  b.set(63);
  b.set(64);
  b.set(199);
  EXPECT_EQ(b.find_set(0), 0u);
  EXPECT_EQ(b.find_set(1), 63u);
  EXPECT_EQ(b.find_set(64), 64u);
  EXPECT_EQ(b.find_set(65), 199u);
  EXPECT_EQ(b.find_set(199), 199u);
  EXPECT_EQ(b.find_set(200), 200u);
  EXPECT_EQ(b.count(), 4u);
}

TEST(AtomicBitmap, FindSetIgnoresNothingBeyondSize) {
  // Bits beyond size() can only come from store_word; find_set must not report them.
  AtomicBitmap b(70);
  b.store_word(1, ~uint64_t{0});
  EXPECT_EQ(b.find_set(0), 64u);
  AtomicBitmap c(70);
  c.store_word(1, uint64_t{1} << 10);  // bit 74, past the end
  EXPECT_EQ(c.find_set(0), 70u);
}

TEST(AtomicBitmap, WordAccess) {
  AtomicBitmap b(128);
  b.store_word(1, 0xF0);
  EXPECT_TRUE(b.test(68));
  EXPECT_FALSE(b.test(67));
  EXPECT_EQ(b.word(1), 0xF0u);
  EXPECT_EQ(b.exchange_word(1, 0), 0xF0u);
  EXPECT_EQ(b.word(1), 0u);
  EXPECT_EQ(b.count(), 0u);
}

TEST(AtomicBitmap, ResizeClears) {
  AtomicBitmap b(64);
  b.set(10);
  b.resize(1000);
  EXPECT_EQ(b.size(), 1000u);
  EXPECT_EQ(b.count(), 0u);
}

TEST(AtomicBitmap, ConcurrentSetsOfNeighbouringBitsAreNotLost) {
  constexpr uint64_t kBits = 4096;
  AtomicBitmap b(kBits);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&b, t] {
      for (uint64_t i = static_cast<uint64_t>(t); i < kBits; i += 4) b.set(i);
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(b.count(), kBits);
  EXPECT_TRUE(b.all_set(0, kBits - 1));
  threads.clear();
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&b, t] {
      for (uint64_t i = static_cast<uint64_t>(t); i < kBits; i += 4)
        if (t % 2) b.clear(i);
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(b.count(), kBits / 2);
}

}  // namespace
}  // namespace blockway::cache
