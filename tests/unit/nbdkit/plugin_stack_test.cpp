// PluginStack: the stack over a real file and a real cache, driven as nbdkit
// drives it: requests from several plain threads at once, each blocking on
// run(); then close() and a second stack on the same cache.
#include "nbdkit/plugin_stack.hpp"

#include "tests/support/temp_dir.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
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
  EXPECT_EQ(ro.run(ro.next_loop(), ro.device().write(buf, 0, 0)), std::errc::operation_not_permitted);
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
        auto& loop = stack.next_loop();
        for (int b = 0; b < kBlocks; ++b) {
          std::vector<std::byte> out(4096, std::byte(t * kBlocks + b));
          const uint64_t off = (uint64_t(t) * kBlocks + b) * 4096;
          ASSERT_FALSE(stack.run(loop, stack.device().write(out, off, 0)));
          std::vector<std::byte> in(4096);
          ASSERT_FALSE(stack.run(loop, stack.device().read(in, off, 0)));
          ASSERT_EQ(in, out);
        }
      });
    }
    for (auto& w : workers) w.join();
    stack.close();  // flushes: writeback-local keeps it in the cache
  }
  PluginStack again(cfg);
  auto& loop = again.next_loop();
  for (int i = 0; i < kThreads * kBlocks; ++i) {
    std::vector<std::byte> in(4096);
    ASSERT_FALSE(again.run(loop, again.device().read(in, uint64_t(i) * 4096, 0)));
    ASSERT_EQ(in, std::vector<std::byte>(4096, std::byte(i))) << "block " << i;
  }
}

TEST(PluginStack, ARemoteThatCannotBeOpenedIsAConfigError) {
  test::TempDir dir;
  auto cfg = config(dir.str() + "/missing.img", {});
  EXPECT_THAT(test::what_of<core::ConfigError>([&] { PluginStack s(cfg); }), ::testing::HasSubstr("missing.img"));
}

}  // namespace
}  // namespace blockway::nbdkit
