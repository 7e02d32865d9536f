// FuseOptions: every option parsed, defaults, and bad values refused.
#include "fuse/fuse_options.hpp"

#include <gtest/gtest.h>

#include <unistd.h>

namespace blockway::fuse {
namespace {

using core::ConfigError;
using namespace std::chrono_literals;

TEST(FuseOptions, ParsesEveryOption) {
  const auto o = FuseOptions::parse(
      {{"mode", "0600"}, {"uid", "12"}, {"gid", "34"}, {"allow-other", "on"}, {"direct-io", "yes"}, {"readers", "2"}});
  EXPECT_EQ(o.readers, 2u);
  EXPECT_EQ(o.mode, 0600u);
  EXPECT_EQ(o.uid, 12u);
  EXPECT_EQ(o.gid, 34u);
  EXPECT_TRUE(o.allow_other);
  EXPECT_TRUE(o.direct_io);
  const auto d = FuseOptions::parse({});
  EXPECT_EQ(d.mode, 0644u);
  EXPECT_EQ(d.uid, ::geteuid());
  EXPECT_FALSE(d.allow_other);
  EXPECT_FALSE(d.direct_io);
}

TEST(FuseOptions, RefusesBadValues) {
  EXPECT_THROW(FuseOptions::parse({{"mode", "0999"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"mode", "70000"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"uid", "-1"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"uid", "abc"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"allow-other", "perhaps"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"colour", "red"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"readers", "0"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"mount-timeout", "0"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"mount-timeout", "0.5"}}), ConfigError);
  // Seconds take decimals, as every seconds option does.
  EXPECT_EQ(FuseOptions::parse({{"mount-timeout", "1.5"}}).mount_timeout, 1500ms);
  EXPECT_EQ(FuseOptions::parse({{"mount-timeout", "3"}}).mount_timeout, 3s);
  EXPECT_EQ(FuseOptions::parse({}).mount_timeout, 10s);
}

}  // namespace
}  // namespace blockway::fuse
