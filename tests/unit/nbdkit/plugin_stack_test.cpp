// PluginStack: the stack over a real file and a real cache, driven as nbdkit
// drives it: requests from several plain threads at once, each running its
// request on itself through run(); then close() and a second stack on the
// same cache. And run() itself: on the calling thread, back there after a hop
// to one of the stack's loops, exceptions rethrown, reusable after each.
#include "nbdkit/plugin_stack.hpp"

#include "tests/support/temp_dir.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <fstream>
#include <thread>
#include <vector>

namespace blockway::nbdkit {
namespace {

using core::Support;

constexpr uint64_t kSize = 4u << 20;

std::string make_image(const test::TempDir& dir) {
  const std::string path = dir.str() + "/img";
  std::ofstream f(path, std::ios::binary);
  std::vector<char> data(kSize);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7 + 3);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
  return path;
}

PluginConfig config(const std::string& img, std::initializer_list<std::pair<const char*, std::string>> keys) {
  PluginConfig c;
  c.add("uri", "file://" + img);
  for (const auto& [k, v] : keys) c.add(k, v);
  c.complete();
  return c;
}

TEST(PluginStack, CapabilitiesAndGeometryAreTheStacks) {
  test::TempDir dir;
  const auto img = make_image(dir);
  PluginStack rw(config(img, {}));
  EXPECT_EQ(rw.device().geometry().size, kSize);
  const auto c = rw.device().capabilities();
  EXPECT_FALSE(c.read_only);
  EXPECT_NE(c.flush, Support::none);
  EXPECT_NE(c.fua, Support::none);
  EXPECT_NE(c.extents, Support::none);
  rw.close();
  PluginStack ro(config(img, {{"read-only", "on"}}));
  EXPECT_TRUE(ro.device().capabilities().read_only);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(ro.run(ro.device().write(buf, 0, 0)), std::errc::operation_not_permitted);
}

TEST(PluginStack, ParallelRequestsFromPlainThreadsThenReopenOnTheSameCache) {
  test::TempDir dir;
  const auto img = make_image(dir);
  const auto cfg = config(img, {{"cache", dir.str() + "/cache"}, {"mode", "writeback-local"}, {"chunk", "64k"},
                                {"name", "vm1"}, {"threads", "2"}});
  constexpr int kThreads = 8, kBlocks = 32;
  {
    PluginStack stack(cfg);
    std::vector<std::thread> workers;
    for (int t = 0; t < kThreads; ++t) {
      workers.emplace_back([&stack, t] {
        for (int b = 0; b < kBlocks; ++b) {
          std::vector<std::byte> out(4096, std::byte(t * kBlocks + b));
          const uint64_t off = (uint64_t(t) * kBlocks + b) * 4096;
          ASSERT_FALSE(stack.run(stack.device().write(out, off, 0)));
          std::vector<std::byte> in(4096);
          ASSERT_FALSE(stack.run(stack.device().read(in, off, 0)));
          ASSERT_EQ(in, out);
        }
      });
    }
    for (auto& w : workers) w.join();
    stack.close();  // flushes: writeback-local keeps it in the cache
  }
  PluginStack again(cfg);
  for (int i = 0; i < kThreads * kBlocks; ++i) {
    std::vector<std::byte> in(4096);
    ASSERT_FALSE(again.run(again.device().read(in, uint64_t(i) * 4096, 0)));
    ASSERT_EQ(in, std::vector<std::byte>(4096, std::byte(i))) << "block " << i;
  }
}

// Where a task runs: the thread it is on at each step.
core::Task<std::vector<std::thread::id>> where_it_runs(boost::asio::io_context& loop) {
  std::vector<std::thread::id> seen{std::this_thread::get_id()};
  // A hop to one of the stack's loops and back, as a remote session's I/O does.
  auto hop = []() -> core::Task<std::thread::id> { co_return std::this_thread::get_id(); };
  seen.push_back(co_await boost::asio::co_spawn(loop, hop(), boost::asio::use_awaitable));
  seen.push_back(std::this_thread::get_id());
  co_return seen;
}

TEST(PluginStack, RunRunsTheRequestOnTheCallingThreadAndComesBackThereAfterAHop) {
  test::TempDir dir;
  const auto img = make_image(dir);
  PluginStack stack(config(img, {{"threads", "1"}}));
  // The loop's thread id, seen from the loop itself.
  const auto loop_thread = stack.run_on(stack.loop(0), []() -> core::Task<std::thread::id> {
    co_return std::this_thread::get_id();
  }());
  std::vector<std::thread> workers;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    workers.emplace_back([&] {
      for (int i = 0; i < 500; ++i) {
        const auto seen = stack.run(where_it_runs(stack.loop(0)));
        const auto me = std::this_thread::get_id();
        if (seen == std::vector<std::thread::id>{me, loop_thread, me}) ++ok;
      }
    });
  }
  for (auto& w : workers) w.join();
  EXPECT_NE(loop_thread, std::this_thread::get_id());
  EXPECT_EQ(ok, 4 * 500);
}

TEST(PluginStack, RunRethrowsWhatEscapesATaskAndRunsTheNextOne) {
  test::TempDir dir;
  const auto img = make_image(dir);
  PluginStack stack(config(img, {}));
  auto throws = []() -> core::Task<std::error_code> {
    throw std::runtime_error("escaped");
    co_return std::error_code{};
  };
  EXPECT_EQ(test::what_of<std::runtime_error>([&] { (void)stack.run(throws()); }), "escaped");
  auto nothing = []() -> core::Task<void> { co_return; };
  stack.run(nothing());  // Task<void>
  std::vector<std::byte> in(4096);
  EXPECT_FALSE(stack.run(stack.device().read(in, 4096, 0)));
  EXPECT_EQ(in[0], std::byte(4096 * 7 + 3));
}

TEST(PluginStack, ARemoteThatCannotBeOpenedIsAConfigError) {
  test::TempDir dir;
  auto cfg = config(dir.str() + "/missing.img", {});
  EXPECT_THAT(test::what_of<core::ConfigError>([&] { PluginStack s(cfg); }), ::testing::HasSubstr("missing.img"));
}

}  // namespace
}  // namespace blockway::nbdkit
