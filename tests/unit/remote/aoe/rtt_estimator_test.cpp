// RttEstimator: RFC 6298 smoothing, clamping and per-retry back-off.
#include "remote/aoe/rtt_estimator.hpp"

#include <gtest/gtest.h>

namespace blockway::remote::aoe {
namespace {

using std::chrono::microseconds;
using std::chrono::milliseconds;

RttEstimator::Limits wide() {
  RttEstimator::Limits l;
  l.initial = milliseconds(250);
  l.min = microseconds(1);
  l.max = milliseconds(4000);
  l.granularity = microseconds(1);
  return l;
}

TEST(RttEstimator, InitialTimeoutBeforeAnySample) {
  RttEstimator r;
  EXPECT_FALSE(r.has_sample());
  EXPECT_EQ(r.rto(), milliseconds(250));
}

TEST(RttEstimator, FirstSampleSetsSrttAndHalfVariance) {
  RttEstimator r(wide());
  r.sample(milliseconds(8));
  EXPECT_EQ(r.srtt(), milliseconds(8));
  EXPECT_EQ(r.rttvar(), milliseconds(4));
  EXPECT_EQ(r.rto(), milliseconds(8 + 16));  // SRTT + 4 * RTTVAR
}

TEST(RttEstimator, LaterSamplesSmoothAsRfc6298) {
  RttEstimator r(wide());
  r.sample(microseconds(800));
  r.sample(microseconds(1600));
  // RTTVAR = 3/4 * 400 + 1/4 * |800 - 1600| = 500; SRTT = 7/8 * 800 + 1/8 * 1600 = 900
  EXPECT_EQ(r.rttvar(), microseconds(500));
  EXPECT_EQ(r.srtt(), microseconds(900));
  EXPECT_EQ(r.rto(), microseconds(2900));
}

TEST(RttEstimator, SteadyRttConvergesAndClampsToMinimum) {
  RttEstimator r;  // default minimum 10 ms
  for (int i = 0; i < 200; ++i) r.sample(microseconds(50));
  EXPECT_EQ(r.srtt(), microseconds(50));
  EXPECT_EQ(r.rto(), milliseconds(10));
}

TEST(RttEstimator, ClampsToMaximum) {
  RttEstimator r(wide());
  r.sample(milliseconds(3000));
  EXPECT_EQ(r.rto(), milliseconds(4000));
}

TEST(RttEstimator, BackoffDoublesPerRetryUpToMaximum) {
  RttEstimator r(wide());
  r.sample(milliseconds(10));  // RTO 30 ms
  EXPECT_EQ(r.backoff(0), milliseconds(30));
  EXPECT_EQ(r.backoff(1), milliseconds(60));
  EXPECT_EQ(r.backoff(3), milliseconds(240));
  EXPECT_EQ(r.backoff(20), milliseconds(4000));
  EXPECT_EQ(r.backoff(1000), milliseconds(4000));
}

TEST(RttEstimator, SlowerPathRaisesTimeoutQuickly) {
  RttEstimator r(wide());
  for (int i = 0; i < 50; ++i) r.sample(milliseconds(1));
  const auto before = r.rto();
  r.sample(milliseconds(40));
  EXPECT_GT(r.rto(), before * 4);  // the variance term reacts at once
}

}  // namespace
}  // namespace blockway::remote::aoe
