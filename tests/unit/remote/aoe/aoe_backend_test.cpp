// The aoe:// backend: what check() accepts without the network, and its options.
#include "remote/aoe/aoe_backend.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>

namespace blockway::remote::aoe {
namespace {

using ::testing::HasSubstr;

std::string check_error(const std::string& text, std::map<std::string, std::string> values = {}) {
  core::Options options(values);
  return test::what_of<core::ConfigError>([&] { kBackend.check(text, options); });
}

TEST(AoeBackend, ChecksWithoutTheNetwork) {
  // An interface that does not exist still passes check(): only open() looks.
  EXPECT_EQ(check_error("aoe://nosuchif0/0.1"), "");
  EXPECT_THAT(check_error("aoe://eth0/0.256"), HasSubstr("slot '256'"));
  EXPECT_THAT(check_error("aoe://eth0/0.1", {{"io-timeout", "0"}}), HasSubstr("option io-timeout='0'"));
  EXPECT_THAT(check_error("aoe://eth0/0.1", {{"discover-timeout", "x"}}), HasSubstr("option discover-timeout='x'"));
  EXPECT_EQ(check_error("aoe://eth0/0.1", {{"io-timeout", "2.5"}}), "");
}

TEST(AoeBackend, OptionsAreParsedAndTaken) {
  std::map<std::string, std::string> values{{"io-timeout", "2.5"}, {"discover-timeout", "1"}, {"other", "x"}};
  core::Options options(values);
  const auto o = take_options(options);
  EXPECT_EQ(o.io_timeout, std::chrono::milliseconds(2500));
  EXPECT_EQ(o.discover_timeout, std::chrono::milliseconds(1000));
  EXPECT_EQ(values.size(), 1u);
  EXPECT_TRUE(values.contains("other"));
  std::map<std::string, std::string> none;
  core::Options defaults(none);
  EXPECT_EQ(take_options(defaults).io_timeout, std::chrono::milliseconds(15000));
}

}  // namespace
}  // namespace blockway::remote::aoe
