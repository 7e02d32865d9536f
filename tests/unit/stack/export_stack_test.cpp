// The shared export stack (stack/export_stack.cpp) over real files, a real
// cache and a refusing NBD remote: which layers it puts where, when it asks
// for the catalogue, a detached export opening without its remote, an
// uncached file followed as it grows, and the messages a bad option or a
// remote that cannot be opened give.
#include "stack/export_stack.hpp"

#include "tests/support/temp_dir.hpp"
#include "tests/support/test_util.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/use_future.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <thread>
#include <vector>

namespace blockway::stack {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kSize = 1u << 20;

std::string make_image(const std::string& path) {
  std::ofstream f(path, std::ios::binary);
  std::vector<char> data(kSize);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 13 + 1);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
  return path;
}

// Event loops run by a thread of the fixture, and a catalogue that counts
// how often the stack asks for it.
class ExportStackTest : public ::testing::Test {
 protected:
  ExportStackTest() : loops_(1, 2), runner_([this] { loops_.run(); }) {}
  ~ExportStackTest() override {
    loops_.release();
    runner_.join();
  }

  Context context() {
    return {loops_, [this]() -> cache::MetaStore& {
              ++catalogue_calls_;
              if (!catalogue_) catalogue_ = open_catalogue(dir_.str() + "/data");
              return *catalogue_;
            }};
  }

  Stack build(const std::string& name, const std::string& uri, std::map<std::string, std::string> values,
              bool read_only = false) {
    core::Options options(values, "export '" + name + "'");
    return stack::build({name, uri, read_only}, options, context());
  }

  std::string build_error(const std::string& uri, std::map<std::string, std::string> values) {
    return test::what_of<core::ConfigError>([&] { (void)build("e", uri, std::move(values)); });
  }

  template <class T>
  T run(core::Task<T> task) {
    return boost::asio::co_spawn(loops_.at(0), std::move(task), boost::asio::use_future).get();
  }

  test::TempDir dir_;
  core::EventLoops loops_;
  std::thread runner_;
  std::unique_ptr<cache::MetaStore> catalogue_;
  int catalogue_calls_ = 0;
};

TEST_F(ExportStackTest, AFileWithoutACacheIsQosAndTheCheckpointOverTheFile) {
  const auto img = make_image(dir_.str() + "/img");
  auto s = build("plain", "file://" + img, {{"qos-read-iops", "1000"}});
  ASSERT_TRUE(s.device);
  EXPECT_EQ(s.cache, nullptr);
  EXPECT_EQ(s.retry, nullptr);  // a local file has no session to lose
  EXPECT_EQ(s.remote, nullptr);
  ASSERT_NE(s.qos, nullptr);
  EXPECT_EQ(s.qos->limits().read_iops, 1000u);
  EXPECT_EQ(catalogue_calls_, 0) << "an uncached export must not open the catalogue";
  EXPECT_FALSE(std::filesystem::exists(dir_.str() + "/data"));
  EXPECT_EQ(s.device->geometry().size, kSize);
  std::vector<std::byte> buf(4096);
  EXPECT_FALSE(run(s.device->read(buf, 4096, 0)));
  EXPECT_EQ(buf[0], std::byte{1});  // (4096 * 13 + 1) mod 256
  auto ro = build("ro", "file://" + img, {}, true);
  EXPECT_TRUE(ro.device->capabilities().read_only);
  EXPECT_EQ(run(ro.device->write(buf, 0, 0)), std::errc::operation_not_permitted);
}

TEST_F(ExportStackTest, AnUncachedFileIsFollowedWhenItGrowsACachedOneIsNot) {
  const auto img = make_image(dir_.str() + "/img");
  auto s = build("plain", "file://" + img, {});
  ASSERT_TRUE(s.follow_size);
  std::filesystem::resize_file(img, 3 * kSize);
  EXPECT_EQ(s.device->geometry().size, kSize) << "followed when a front end asks, not before";
  std::vector<std::byte> buf(4096, std::byte{7});
  EXPECT_EQ(run(s.device->write(buf, 2 * kSize, 0)), std::errc::no_space_on_device);
  s.follow_size();
  EXPECT_EQ(s.device->geometry().size, 3 * kSize);
  EXPECT_FALSE(run(s.device->write(buf, 3 * kSize - buf.size(), 0)));
  // A shrink is not taken.
  std::filesystem::resize_file(img, 2 * kSize);
  s.follow_size();
  EXPECT_EQ(s.device->geometry().size, 3 * kSize);
  // A cached stack keeps its size while served: nothing to follow.
  auto cached = build("cached", "file://" + img, {{"cache", dir_.str() + "/cache"}, {"chunk", "64k"}});
  EXPECT_FALSE(cached.follow_size);
}

TEST_F(ExportStackTest, ACachedExportDetachedEarlierOpensWithoutItsRemote) {
  const auto img = make_image(dir_.str() + "/img");
  const std::map<std::string, std::string> cached = {{"cache", dir_.str() + "/cache"}, {"chunk", "64k"}};
  {
    auto s = build("vm", "file://" + img, cached);
    ASSERT_NE(s.cache, nullptr);
    EXPECT_GE(catalogue_calls_, 1);
    EXPECT_THAT(s.device->describe(), HasSubstr(img));
    EXPECT_FALSE(run(s.device->flush()));
    run(s.device->close());
  }
  // Mark it detached as `blockway detach` does once every block is local; the
  // remote is gone, the stack still opens from its cache file alone.
  catalogue_->set_state("vm", "detached", "1");
  std::filesystem::remove(img);
  EXPECT_THAT(build_error("file://" + img, {}), HasSubstr("cannot open"));  // uncached: opens the file
  auto s = build("vm", "file://" + img, cached);
  ASSERT_NE(s.cache, nullptr);
  EXPECT_THAT(s.device->describe(), HasSubstr("(detached from file://" + img + ")"));
  EXPECT_EQ(s.device->geometry().size, kSize);
  run(s.device->close());
  // Configured with another remote since: refused, naming the export.
  EXPECT_THAT(test::what_of<core::ConfigError>([&] { (void)build("vm", "file:///elsewhere.img", cached); }),
              HasSubstr("export 'vm' is detached (local mode) from file://" + img));
}

TEST_F(ExportStackTest, BadOptionsAndRemotesGiveTheDaemonsMessages) {
  const auto img = make_image(dir_.str() + "/img");
  EXPECT_THAT(build_error("file://" + img, {{"bogus", "1"}}), HasSubstr("unknown option 'bogus'"));
  EXPECT_THAT(build_error("file://" + img, {{"mode", "writeback"}}), HasSubstr("'mode' needs a cache directory"));
  EXPECT_THAT(build_error("file://" + img, {{"retry-timeout", "5"}}), HasSubstr("unknown option 'retry-timeout'"));
  EXPECT_THAT(build_error("gopher://x/y", {}), HasSubstr("unknown scheme 'gopher'"));
  // Nothing listens on port 1: the open fails, named after the export.
  EXPECT_THAT(build_error("nbd://127.0.0.1:1/x", {{"retry-timeout", "1"}}),
              ::testing::AllOf(HasSubstr("export 'e': "), HasSubstr("127.0.0.1:1")));
  EXPECT_THAT(build_error("file://" + img, {{"cache", "/proc/no/such/dir"}}), HasSubstr("export 'e': "));
}

TEST_F(ExportStackTest, CheckTakesWhatBuildTakesWithoutOpening) {
  std::map<std::string, std::string> values = {
      {"retry-timeout", "1"}, {"cache", "/c"}, {"mode", "writeback"}, {"qos-write-bps", "1M"}};
  core::Options options(values, "export 'c'");
  const auto layers = check("nbd://127.0.0.1:1/x", options);  // nothing listens: not opened
  EXPECT_NO_THROW(options.finish());
  ASSERT_TRUE(layers.cache);
  EXPECT_EQ(layers.cache->dir, "/c");
  EXPECT_EQ(layers.qos.write_bps, 1u << 20);
  std::map<std::string, std::string> bad = {{"retry-timeout", "soon"}};
  core::Options o(bad, "export 'c'");
  EXPECT_THAT(test::what_of<core::ConfigError>([&] { (void)check("nbd://127.0.0.1:1/x", o); }),
              HasSubstr("retry-timeout"));
  std::map<std::string, std::string> file_retry = {{"retry-timeout", "1"}};
  core::Options f(file_retry, "export 'c'");
  (void)check("file:///x.img", f);
  EXPECT_THAT(test::what_of<core::ConfigError>([&] { f.finish(); }), HasSubstr("unknown option 'retry-timeout'"));
}

}  // namespace
}  // namespace blockway::stack
