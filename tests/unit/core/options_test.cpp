// Unit tests for core/options: sizes, booleans and the errors that name the setting.
#include "core/options.hpp"

#include "core/options.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

namespace blockway::core {
namespace {

using ::testing::HasSubstr;

// The message of the ConfigError that f throws ("" if it throws none).
template <class F>
std::string config_error(F&& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

// ---------------------------------------------------------------- parse_size / parse_bool

TEST(ParseSize, PlainNumbersAndBinaryUnits) {
  EXPECT_EQ(parse_size("0", "x"), 0u);
  EXPECT_EQ(parse_size("4096", "x"), 4096u);
  EXPECT_EQ(parse_size("64k", "x"), 64u << 10);
  EXPECT_EQ(parse_size("64K", "x"), 64u << 10);
  EXPECT_EQ(parse_size("32M", "x"), 32u << 20);
  EXPECT_EQ(parse_size("1G", "x"), 1ull << 30);
  EXPECT_EQ(parse_size("2t", "x"), 2ull << 40);
  EXPECT_EQ(parse_size("18446744073709551615", "x"), UINT64_MAX);
}

TEST(ParseSize, RejectsGarbageAndNamesTheSetting) {
  for (const char* bad : {"", "k", "-1", "1.5G", "12x", " 12", "12 ", "0x10", "1kk", "18446744073709551616"}) {
    const auto msg = config_error([&] { parse_size(bad, "max-inflight"); });
    EXPECT_THAT(msg, HasSubstr("max-inflight")) << "input '" << bad << "'";
  }
}

TEST(ParseSize, RejectsOverflowThroughTheUnit) {
  EXPECT_THAT(config_error([] { parse_size("16777216T", "max-request"); }), HasSubstr("too large"));
  EXPECT_EQ(parse_size("16777215T", "x"), 16777215ull << 40);
}

TEST(ParseBool, AcceptsTheUsualSpellings) {
  for (const char* t : {"on", "true", "yes", "1", "ON", "True", "YES"}) EXPECT_TRUE(parse_bool(t, "x")) << t;
  for (const char* f : {"off", "false", "no", "0", "OFF", "False"}) EXPECT_FALSE(parse_bool(f, "x")) << f;
}

TEST(ParseBool, RejectsOtherWordsAndNamesTheSetting) {
  for (const char* bad : {"", "maybe", "2", "onn", "y"}) {
    const auto msg = config_error([&] { parse_bool(bad, "read-only"); });
    EXPECT_THAT(msg, HasSubstr("read-only")) << "input '" << bad << "'";
  }
}

}  // namespace
}  // namespace blockway::core
