#include "remote/aoe/rtt_estimator.hpp"

#include <algorithm>

namespace blockway::remote::aoe {

void RttEstimator::sample(Duration rtt) noexcept {
  if (rtt < Duration::zero()) rtt = Duration::zero();
  if (samples_++ == 0) {
    srtt_ = rtt;
    rttvar_ = rtt / 2;
    return;
  }
  const Duration err = srtt_ > rtt ? srtt_ - rtt : rtt - srtt_;
  rttvar_ = (3 * rttvar_ + err) / 4;  // beta = 1/4
  srtt_ = (7 * srtt_ + rtt) / 8;      // alpha = 1/8
}

RttEstimator::Duration RttEstimator::rto() const noexcept {
  if (samples_ == 0) return std::clamp(limits_.initial, limits_.min, limits_.max);
  const Duration raw = srtt_ + std::max(limits_.granularity, 4 * rttvar_);
  return std::clamp(raw, limits_.min, limits_.max);
}

RttEstimator::Duration RttEstimator::backoff(unsigned retries) const noexcept {
  Duration d = rto();
  for (unsigned i = 0; i < retries && d < limits_.max; ++i) d *= 2;
  return std::min(d, limits_.max);
}

}  // namespace blockway::remote::aoe
