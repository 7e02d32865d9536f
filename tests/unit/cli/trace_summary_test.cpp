// Trace files: reading (and refusing what is not one), percentiles, and the
// summary's counts and hottest regions.
#include "cli/trace_summary.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sstream>

namespace blockway::cli {
namespace {

using ::testing::HasSubstr;

const std::string kHead = "# blockway trace v1 export=a size=4194304\nstart_ns,op,offset,length,latency_ns,cache,error\n";

TraceFile parse(const std::string& text) {
  std::istringstream in(text);
  return read_trace(in);
}

std::string error_of(const std::string& text) {
  try {
    parse(text);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

TEST(TraceFile, ReadsRecordsAndSkipsComments) {
  const auto t = parse(kHead + "10,read,4096,512,2000,hit,0\n20,write,0,8192,3000,-,5\n# end: 2 records\n");
  EXPECT_EQ(t.header, "export=a size=4194304");
  ASSERT_EQ(t.records.size(), 2u);
  EXPECT_EQ(t.records[0].offset, 4096u);
  EXPECT_EQ(t.records[0].cache, "hit");
  EXPECT_EQ(t.records[1].op, "write");
  EXPECT_EQ(t.records[1].error, 5);
}

TEST(TraceFile, RefusalsNameTheLine) {
  EXPECT_THAT(error_of("start_ns,op\n"), HasSubstr("line 1: not a blockway trace"));
  EXPECT_THAT(error_of("# blockway trace v1\nwrong\n"), HasSubstr("line 2: expected the column names"));
  EXPECT_THAT(error_of(kHead + "1,read,0,1\n"), HasSubstr("line 3: 4 fields, expected 7"));
  EXPECT_THAT(error_of(kHead + "1,read,x,1,1,-,0\n"), HasSubstr("line 3: offset 'x' is not a number"));
  EXPECT_THAT(error_of(kHead + "1,fly,0,1,1,-,0\n"), HasSubstr("unknown operation 'fly'"));
  EXPECT_THAT(error_of(kHead + "1,read,0,1,1,maybe,0\n"), HasSubstr("cache must be hit, miss or -"));
}

TEST(Percentile, NearestRank) {
  std::vector<uint64_t> v;
  for (uint64_t i = 1; i <= 1000; ++i) v.push_back(i);
  EXPECT_EQ(percentile(v, 50), 500u);
  EXPECT_EQ(percentile(v, 90), 900u);
  EXPECT_EQ(percentile(v, 99), 990u);
  EXPECT_EQ(percentile(v, 99.9), 999u);
  EXPECT_EQ(percentile(v, 100), 1000u);
  EXPECT_EQ(percentile({7}, 50), 7u);
  EXPECT_EQ(percentile({}, 50), 0u);
}

TEST(TraceSummary, CountsPerOperationAndHottestRegions) {
  std::string text = kHead;
  for (int i = 0; i < 10; ++i) text += std::to_string(i) + ",read,1048576,4096," + std::to_string((i + 1) * 100) + ",miss,0\n";
  for (int i = 0; i < 3; ++i) text += "20,write,0,4096,50,-,0\n";
  text += "30,read,3145728,4096,70,hit,0\n30,flush,0,0,9999,-,0\n31,read,4194304,4096,1,-,22\n";
  const auto s = summarize_trace(parse(text), 1 << 20, 10);
  EXPECT_EQ(s["records"], 16);
  const auto& r = s["ops"]["read"];
  EXPECT_EQ(r["count"], 12);
  EXPECT_EQ(r["bytes"], 12 * 4096);
  EXPECT_EQ(r["errors"], 1);
  EXPECT_EQ(r["cache_hits"], 1);
  EXPECT_EQ(r["cache_misses"], 10);
  EXPECT_EQ(r["latency_ns"]["max"], 1000);
  EXPECT_EQ(r["latency_ns"]["p50"], 400);  // sorted: 1, 70, 100, 200 ... 1000; the 6th of 12
  EXPECT_EQ(s["ops"]["flush"]["count"], 1);
  const auto& hot = s["hottest_regions"];
  ASSERT_EQ(hot.size(), 4u);  // flushes have no region
  EXPECT_EQ(hot[0]["offset"], 1 << 20);
  EXPECT_EQ(hot[0]["requests"], 10);
  EXPECT_EQ(hot[1]["offset"], 0);
  EXPECT_EQ(hot[1]["writes"], 3);
  EXPECT_EQ(hot[2]["offset"], 3 << 20);  // ties in offset order
  EXPECT_EQ(hot[3]["offset"], 4 << 20);
  EXPECT_EQ(summarize_trace(parse(text), 1 << 20, 1)["hottest_regions"].size(), 1u);
  const std::string human = format_trace_summary(s);
  EXPECT_THAT(human, HasSubstr("p99.9 ms"));
  EXPECT_THAT(human, HasSubstr("hottest regions (1.0 MiB each)"));
}

}  // namespace
}  // namespace blockway::cli
