// RttEstimator: the retransmission timeout of AoE frames, estimated from
// measured round trips as TCP does (RFC 6298): a smoothed RTT and its mean
// deviation, RTO = SRTT + max(G, 4 * RTTVAR), clamped to [min, max]. Only
// frames answered without a retransmission are sampled (Karn's rule; the
// caller enforces it). A frame's n-th retransmission waits RTO * 2^n.
//
// Plain value type, no threads (each AoE session owns one on its loop).
#pragma once

#include <chrono>

namespace blockway::remote::aoe {

class RttEstimator {
 public:
  using Duration = std::chrono::microseconds;
  struct Limits {
    Duration initial{std::chrono::milliseconds(250)};  // before the first sample
    Duration min{std::chrono::milliseconds(10)};
    Duration max{std::chrono::seconds(4)};
    Duration granularity{std::chrono::milliseconds(1)};
  };

  RttEstimator() : RttEstimator(Limits{}) {}
  explicit RttEstimator(Limits limits) noexcept : limits_(limits) {}

  void sample(Duration rtt) noexcept;
  [[nodiscard]] Duration rto() const noexcept;
  // How long to wait after the `retries`-th retransmission of one frame.
  [[nodiscard]] Duration backoff(unsigned retries) const noexcept;

  [[nodiscard]] bool has_sample() const noexcept { return samples_ > 0; }
  [[nodiscard]] Duration srtt() const noexcept { return srtt_; }
  [[nodiscard]] Duration rttvar() const noexcept { return rttvar_; }
  [[nodiscard]] const Limits& limits() const noexcept { return limits_; }

 private:
  Limits limits_;
  Duration srtt_{0};
  Duration rttvar_{0};
  unsigned long samples_ = 0;
};

}  // namespace blockway::remote::aoe
