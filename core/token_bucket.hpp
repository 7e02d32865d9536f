// TokenBucket: the arithmetic of one rate limit (operations or bytes per
// second) with a burst, against an explicit clock so that it can be tested
// without sleeping.
//
// The bucket fills at `rate` tokens per second up to `capacity` (the burst).
// A request of `cost` tokens may start once the bucket holds min(cost,
// capacity): a request larger than the burst waits for a full bucket and
// then borrows, leaving the level negative, so later requests repay its debt
// and the long-run rate still holds, yet a huge request never waits forever.
//
// Reservations: take() may be called for a time later than now (when a
// queued request will start); the bucket then stands at that future time and
// every later request is computed from there, which is what makes a queue of
// requests FIFO without a scheduler: their start times only increase.
//
// Thread model: none; the owner (QosLayer) holds its lock around every call.
#pragma once

#include <chrono>

namespace blockway::core {

class TokenBucket {
 public:
  using Clock = std::chrono::steady_clock;

  // rate 0 = unlimited (ready_at() is always `t`). The level starts full.
  void configure(double rate, double capacity, Clock::time_point now) noexcept;
  // New limits, keeping the current level (clamped to the new capacity).
  void reconfigure(double rate, double capacity, Clock::time_point now) noexcept;
  // Empties the bucket at `now` (level 0): the starting point of a queue
  // that is scheduled again after a change.
  void drain(Clock::time_point now) noexcept;

  [[nodiscard]] bool unlimited() const noexcept { return rate_ <= 0; }
  [[nodiscard]] double rate() const noexcept { return rate_; }
  [[nodiscard]] double capacity() const noexcept { return capacity_; }
  // The level at t (t before the last reservation counts as the last reservation).
  [[nodiscard]] double level_at(Clock::time_point t) const noexcept;
  // The earliest time, not before t nor the last reservation, at which a
  // request of `cost` may start.
  [[nodiscard]] Clock::time_point ready_at(double cost, Clock::time_point t) const noexcept;
  // Takes `cost` at time t (t >= the last reservation).
  void take(double cost, Clock::time_point t) noexcept;

 private:
  double rate_ = 0;
  double capacity_ = 0;
  double level_ = 0;
  Clock::time_point stamp_{};
};

}  // namespace blockway::core
