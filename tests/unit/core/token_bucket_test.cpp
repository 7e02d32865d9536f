// TokenBucket against an explicit clock: refill, burst, borrowing for
// requests larger than the burst, FIFO reservations, unlimited, changes.
#include "core/token_bucket.hpp"

#include <gtest/gtest.h>

namespace blockway::core {
namespace {

using Clock = TokenBucket::Clock;
using namespace std::chrono_literals;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

const Clock::time_point t0 = Clock::time_point{} + 1000s;

TEST(TokenBucket, BurstPassesAtOnceThenTheRateHolds) {
  TokenBucket b;
  b.configure(100, 10, t0);  // 100/s, a burst of 10
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(b.ready_at(1, t0), t0) << i;
    b.take(1, t0);
  }
  // The 11th waits one token: 10 ms.
  const auto at = b.ready_at(1, t0);
  EXPECT_NEAR(seconds(at - t0), 0.010, 1e-6);
  b.take(1, at);
  // 100 more, reserved back to back, start 1 s later at the rate.
  auto last = at;
  for (int i = 0; i < 100; ++i) {
    last = b.ready_at(1, t0);
    b.take(1, last);
  }
  EXPECT_NEAR(seconds(last - at), 1.0, 1e-5);
}

TEST(TokenBucket, RefillsUpToTheBurstOnly) {
  TokenBucket b;
  b.configure(1000, 100, t0);
  b.take(100, t0);
  EXPECT_DOUBLE_EQ(b.level_at(t0), 0);
  EXPECT_NEAR(b.level_at(t0 + 50ms), 50, 1e-6);
  EXPECT_DOUBLE_EQ(b.level_at(t0 + 10s), 100);  // idle for long: still only the burst
}

TEST(TokenBucket, AHugeRequestBorrowsAndLaterOnesRepay) {
  TokenBucket b;
  b.configure(1 << 20, 1 << 20, t0);  // 1 MiB/s, burst 1 MiB
  // 8 MiB: more than the burst; it passes on a full bucket.
  EXPECT_EQ(b.ready_at(8 << 20, t0), t0);
  b.take(8 << 20, t0);
  EXPECT_DOUBLE_EQ(b.level_at(t0), -7.0 * (1 << 20));
  // The next 4k request waits until the 7 MiB debt is repaid plus its own 4k.
  const auto at = b.ready_at(4096, t0);
  EXPECT_NEAR(seconds(at - t0), 7.0 + 4096.0 / (1 << 20), 1e-5);
  // A huge request on a half-full bucket waits for a full one, never longer.
  TokenBucket c;
  c.configure(1000, 1000, t0);
  c.take(500, t0);
  EXPECT_NEAR(seconds(c.ready_at(1e9, t0) - t0), 0.5, 1e-6);
}

TEST(TokenBucket, ReservationsAreInOrder) {
  TokenBucket b;
  b.configure(10, 1, t0);
  Clock::time_point prev = t0;
  // Requests of mixed sizes: each one's start is never before the previous one's.
  for (double cost : {1.0, 5.0, 1.0, 0.5, 3.0, 1.0}) {
    const auto at = b.ready_at(cost, t0);
    EXPECT_GE(at, prev);
    b.take(cost, at);
    prev = at;
  }
}

TEST(TokenBucket, RateZeroIsUnlimited) {
  TokenBucket b;
  b.configure(0, 0, t0);
  for (int i = 0; i < 1000; ++i) {
    EXPECT_EQ(b.ready_at(1e12, t0), t0);
    b.take(1e12, t0);
  }
  EXPECT_TRUE(b.unlimited());
}

TEST(TokenBucket, ReconfigureKeepsTheLevelWithinTheNewBurst) {
  TokenBucket b;
  b.configure(100, 100, t0);
  b.take(30, t0);
  b.reconfigure(10, 50, t0);  // 70 left, clamped to the new burst of 50
  EXPECT_DOUBLE_EQ(b.level_at(t0), 50);
  b.drain(t0);
  EXPECT_NEAR(seconds(b.ready_at(1, t0) - t0), 0.1, 1e-6);  // from empty at the new rate
}

}  // namespace
}  // namespace blockway::core
