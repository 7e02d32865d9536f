// Unit tests for cache/overlay_config: a clone's overlay options.
#include "cache/overlay_config.hpp"

#include "core/options.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>

namespace blockway::cache {
namespace {

using Options = std::map<std::string, std::string>;

OverlayConfig take(Options& values) {
  core::Options opts(values, "export 'vm1'");
  return OverlayConfig::take_from(opts, "/var/lib/blockway/overlays");
}

std::string error_of(Options opts) {
  return test::what_of<core::ConfigError>([&] { (void)take(opts); });
}

TEST(OverlayConfig, CloneUris) {
  EXPECT_EQ(clone_base_of("clone:golden"), "golden");
  EXPECT_EQ(clone_base_of("clone:"), "");
  EXPECT_FALSE(clone_base_of("file:///clone:x").has_value());
  EXPECT_FALSE(clone_base_of("nbd://h/e").has_value());
}

TEST(OverlayConfig, DefaultsAndValues) {
  Options none;
  const auto d = take(none);
  EXPECT_EQ(d.dir, "/var/lib/blockway/overlays");
  EXPECT_EQ(d.granularity, 64u << 10);
  Options o{{"overlay", "/srv/ov"}, {"granularity", "16k"}, {"other", "1"}};
  const auto c = take(o);
  EXPECT_EQ(c.dir, "/srv/ov");
  EXPECT_EQ(c.granularity, 16384u);
  EXPECT_EQ(o.size(), 1u);  // not ours: left for the caller
}

TEST(OverlayConfig, BadValuesAreRefusedByName) {
  EXPECT_NE(error_of({{"overlay", "rel/dir"}}).find("option 'overlay' needs an absolute directory path"),
            std::string::npos) << error_of({{"overlay", "rel/dir"}});
  for (const char* g : {"2k", "128k", "12k", "0"})
    EXPECT_NE(error_of({{"granularity", g}}).find("must be a power of two between 4k and 64k"), std::string::npos)
        << g << ": " << error_of({{"granularity", g}});
  Options given{{"granularity", "4k"}};
  core::Options opts(given, "export 'vm1'");
  EXPECT_TRUE(OverlayConfig::given(opts));
}

}  // namespace
}  // namespace blockway::cache
