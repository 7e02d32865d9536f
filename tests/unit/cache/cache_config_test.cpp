// Unit tests for cache/cache_config: per-export cache options.
#include "cache/cache_config.hpp"

#include "core/options.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>

namespace blockway::cache {
namespace {

using Options = std::map<std::string, std::string>;

// CacheConfig::take_from on the options of an export named vm1.
std::optional<CacheConfig> take(Options& values) {
  core::Options opts(values, "export 'vm1'");
  return CacheConfig::take_from(opts);
}

// The message of the ConfigError that take_from throws, or "" if it does not.
std::string error_of(Options opts) {
  return test::what_of<core::ConfigError>([&] { (void)take(opts); });
}

TEST(CacheConfig, NoCacheKeyMeansNoCache) {
  Options o{{"other", "1"}};
  EXPECT_FALSE(take(o).has_value());
  EXPECT_EQ(o.size(), 1u);  // not ours: left for the caller
}

TEST(CacheConfig, Defaults) {
  Options o{{"cache", "/var/cache/bw"}};
  auto c = take(o);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->dir, "/var/cache/bw");
  EXPECT_EQ(c->mode, WriteMode::writethrough);
  EXPECT_EQ(c->chunk_size, 64u << 10);
  EXPECT_FALSE(c->preallocate);
  EXPECT_TRUE(o.empty());
}

TEST(CacheConfig, EveryOptionParsedAndTaken) {
  Options o{{"cache", "/c"}, {"mode", "writeback-local"}, {"chunk", "256k"},
            {"preallocate", "on"}, {"readahead", "1M"}, {"keep", "x"}};
  auto c = take(o);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->mode, WriteMode::writeback_local);
  EXPECT_EQ(c->chunk_size, 256u << 10);
  EXPECT_TRUE(c->preallocate);
  EXPECT_EQ(c->readahead_chunks, 4u);  // 1M / 256k
  EXPECT_EQ(o, (Options{{"keep", "x"}}));
}

TEST(CacheConfig, Modes) {
  for (auto [text, mode] : {std::pair{"writethrough", WriteMode::writethrough},
                            std::pair{"writeback", WriteMode::writeback},
                            std::pair{"writeback-local", WriteMode::writeback_local}}) {
    Options o{{"cache", "/c"}, {"mode", text}};
    auto c = take(o);
    ASSERT_TRUE(c);
    EXPECT_EQ(c->mode, mode);
    EXPECT_EQ(to_string(mode), text);
  }
}

TEST(CacheConfig, WritebackDelayTakesSecondsWithDecimals) {
  Options o{{"cache", "/c"}, {"writeback-delay", "1.5"}};
  EXPECT_EQ(take(o)->writeback_delay, std::chrono::milliseconds(1500));
  EXPECT_NE(error_of({{"cache", "/c"}, {"writeback-delay", "3601"}}).find("writeback-delay='3601'"), std::string::npos);
}

TEST(CacheConfig, ReadaheadZeroDisables) {
  Options o{{"cache", "/c"}, {"readahead", "0"}};
  EXPECT_EQ(take(o)->readahead_chunks, 0u);
}

TEST(CacheConfig, ChunkBounds) {
  for (const char* ok : {"4k", "4096", "16M", "1M"}) {
    Options o{{"cache", "/c"}, {"chunk", ok}};
    EXPECT_TRUE(take(o)) << ok;
  }
  for (const char* bad : {"2k", "32M", "96k", "5000", "0"}) {
    const auto msg = error_of({{"cache", "/c"}, {"chunk", bad}});
    EXPECT_NE(msg.find("chunk"), std::string::npos) << bad << ": " << msg;
    EXPECT_NE(msg.find("vm1"), std::string::npos) << msg;
  }
}

TEST(CacheConfig, ErrorsNameTheOption) {
  struct Case {
    Options opts;
    const char* option;
  };
  const Case cases[] = {
      {{{"cache", "/c"}, {"mode", "writearound"}}, "mode"},
      {{{"cache", "/c"}, {"chunk", "lots"}}, "chunk"},
      {{{"cache", "/c"}, {"preallocate", "maybe"}}, "preallocate"},
      {{{"cache", "/c"}, {"readahead", "1T"}}, "readahead"},
      {{{"cache", "/c"}, {"readahead", "fast"}}, "readahead"},
      {{{"cache", "relative/dir"}}, "cache"},
      {{{"cache", ""}}, "cache"},
      {{{"mode", "writeback"}}, "mode"},
      {{{"chunk", "64k"}}, "chunk"},
      {{{"preallocate", "on"}}, "preallocate"},
      {{{"readahead", "1M"}}, "readahead"},
  };
  for (const auto& c : cases) {
    const auto msg = error_of(c.opts);
    ASSERT_FALSE(msg.empty()) << "no error for option " << c.option;
    EXPECT_NE(msg.find(c.option), std::string::npos) << msg;
    EXPECT_NE(msg.find("vm1"), std::string::npos) << msg;
  }
}

TEST(CacheConfig, BadModeNamesTheValue) {
  const auto msg = error_of({{"cache", "/c"}, {"mode", "writearound"}});
  EXPECT_NE(msg.find("writearound"), std::string::npos) << msg;
}

TEST(CacheConfig, PrefetchOptions) {
  Options o{{"cache", "/c"}};
  auto c = take(o);
  EXPECT_FALSE(c->prefetch_auto);
  EXPECT_EQ(c->prefetch_rate, 0u);
  EXPECT_FALSE(c->auto_detach);
  o = {{"cache", "/c"}, {"prefetch", "hot-first"}, {"prefetch-rate", "50M"}, {"auto-detach", "on"}};
  c = take(o);
  EXPECT_TRUE(c->prefetch_auto);
  EXPECT_EQ(c->prefetch_order, core::PrefetchOrder::hot_first);
  EXPECT_EQ(c->prefetch_rate, 50u << 20);
  EXPECT_TRUE(c->auto_detach);
  EXPECT_TRUE(o.empty());
  o = {{"cache", "/c"}, {"prefetch", "sequential"}};
  c = take(o);
  EXPECT_TRUE(c->prefetch_auto);
  EXPECT_EQ(c->prefetch_order, core::PrefetchOrder::sequential);
  o = {{"cache", "/c"}, {"prefetch", "off"}};
  EXPECT_FALSE(take(o)->prefetch_auto);
  EXPECT_NE(error_of({{"cache", "/c"}, {"prefetch", "fast"}}).find("prefetch 'fast' is not off, sequential or hot-first"),
            std::string::npos);
  EXPECT_NE(error_of({{"cache", "/c"}, {"prefetch-rate", "lots"}}).find("prefetch-rate"), std::string::npos);
  EXPECT_NE(error_of({{"cache", "/c"}, {"auto-detach", "maybe"}}).find("auto-detach"), std::string::npos);
  EXPECT_NE(error_of({{"prefetch", "sequential"}}).find("'prefetch' needs a cache directory"), std::string::npos);
  EXPECT_NE(error_of({{"auto-detach", "on"}}).find("'auto-detach' needs a cache directory"), std::string::npos);
}

}  // namespace
}  // namespace blockway::cache
