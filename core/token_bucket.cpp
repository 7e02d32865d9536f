#include "core/token_bucket.hpp"

#include <algorithm>
#include <cmath>

namespace blockway::core {

void TokenBucket::configure(double rate, double capacity, Clock::time_point now) noexcept {
  rate_ = rate;
  capacity_ = capacity;
  level_ = capacity;
  stamp_ = now;
}

void TokenBucket::reconfigure(double rate, double capacity, Clock::time_point now) noexcept {
  if (rate_ <= 0) {  // was unlimited: nothing was owed
    configure(rate, capacity, now);
    return;
  }
  const double level = level_at(now);
  stamp_ = std::max(stamp_, now);
  rate_ = rate;
  capacity_ = capacity;
  level_ = std::min(level, capacity);
}

void TokenBucket::drain(Clock::time_point now) noexcept {
  level_ = 0;
  stamp_ = now;
}

double TokenBucket::level_at(Clock::time_point t) const noexcept {
  if (t <= stamp_) return level_;
  const double seconds = std::chrono::duration<double>(t - stamp_).count();
  return std::min(capacity_, level_ + rate_ * seconds);
}

TokenBucket::Clock::time_point TokenBucket::ready_at(double cost, Clock::time_point t) const noexcept {
  if (unlimited()) return t;
  const auto start = std::max(t, stamp_);
  const double need = std::min(cost, capacity_);
  const double level = level_at(start);
  if (level >= need) return start;
  const double wait = (need - level) / rate_;
  return start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(wait)) +
         Clock::duration(1);  // round up: at the returned time the level is enough
}

void TokenBucket::take(double cost, Clock::time_point t) noexcept {
  if (unlimited()) return;
  level_ = level_at(t) - cost;
  stamp_ = std::max(stamp_, t);
}

}  // namespace blockway::core
