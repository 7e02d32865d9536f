// IoBuffer's pools: buffers freed on another thread come back warm to the
// thread that allocates, and huge buffers are aligned for huge pages.
#include "core/buffer_pool.hpp"

#include <gtest/gtest.h>

#include <sys/resource.h>

#include <cstdint>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

namespace blockway::core {
namespace {

constexpr size_t kTwoMiB = 2u << 20;

TEST(BufferPool, BuffersFreedOnAnotherThreadReturnToTheAllocatingThread) {
  // 48 x 2 MiB is more than one thread's pool keeps (64 MiB): what it cannot
  // keep must reach the shared depot instead of being freed.
  std::vector<IoBuffer> buffers;
  std::set<const std::byte*> allocated;
  buffers.reserve(48);
  std::thread producer([&] {
    for (int i = 0; i < 48; ++i) {
      buffers.emplace_back(kTwoMiB);
      std::memset(buffers.back().data(), 1, kTwoMiB);  // fault every page in
      allocated.insert(buffers.back().data());
    }
  });
  producer.join();
  ASSERT_EQ(allocated.size(), 48u);
  std::thread consumer([&] { buffers.clear(); });
  consumer.join();

  // A fresh thread (empty pool) gets those very buffers back, with their
  // pages in place: writing all of them faults no page in. (Comparing
  // addresses alone proves nothing: freed memory is often mapped again at
  // the same address, fresh and unfaulted.)
  std::vector<const std::byte*> reused;
  long faults = -1;
  std::thread again([&] {
    std::vector<IoBuffer> mine;
    mine.reserve(16);
    reused.reserve(16);
    rusage before{}, after{};
    ::getrusage(RUSAGE_THREAD, &before);
    for (int i = 0; i < 16; ++i) {
      mine.emplace_back(kTwoMiB);
      std::memset(mine.back().data(), 2, kTwoMiB);
      reused.push_back(mine.back().data());
    }
    ::getrusage(RUSAGE_THREAD, &after);
    faults = after.ru_minflt - before.ru_minflt;
  });
  again.join();
  for (const auto* p : reused) EXPECT_TRUE(allocated.count(p)) << "buffer " << p << " is not one of those freed";
  EXPECT_LE(faults, 4) << "16 reused 2 MiB buffers should be warm";
}

TEST(BufferPool, HugeBuffersAreAlignedForHugePagesAndSmallOnesForPages) {
  IoBuffer huge(kTwoMiB);
  IoBuffer receive((1u << 20) + 4096);  // a FUSE receive buffer: class 2 MiB
  IoBuffer small(4096);
  IoBuffer odd(100);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(huge.data()) % kTwoMiB, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(receive.data()) % kTwoMiB, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(small.data()) % 4096, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(odd.data()) % 4096, 0u);
  EXPECT_EQ(odd.size(), 100u);
  // Unpooled sizes (above 32 MiB) work too and are freed by size.
  IoBuffer giant(40u << 20);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(giant.data()) % kTwoMiB, 0u);
  giant.span().back() = std::byte{1};
}

}  // namespace
}  // namespace blockway::core
