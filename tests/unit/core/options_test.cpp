// Unit tests for core/options: the parsers (sizes, seconds, booleans, numbers),
// the Options reader and OptionSpec's help, and the errors that name the
// setting.
#include "core/options.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <string>

namespace blockway::core {
namespace {

using ::testing::HasSubstr;
using test::what_of;

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
    const auto msg = what_of<ConfigError>([&] { parse_size(bad, "max-inflight"); });
    EXPECT_THAT(msg, HasSubstr("max-inflight")) << "input '" << bad << "'";
  }
}

TEST(ParseSize, RejectsOverflowThroughTheUnit) {
  EXPECT_THAT(what_of<ConfigError>([] { parse_size("16777216T", "max-request"); }), HasSubstr("too large"));
  EXPECT_EQ(parse_size("16777215T", "x"), 16777215ull << 40);
}

TEST(ParseBool, AcceptsTheUsualSpellings) {
  for (const char* t : {"on", "true", "yes", "1", "ON", "True", "YES"}) EXPECT_TRUE(parse_bool(t, "x")) << t;
  for (const char* f : {"off", "false", "no", "0", "OFF", "False"}) EXPECT_FALSE(parse_bool(f, "x")) << f;
}

TEST(ParseBool, RejectsOtherWordsAndNamesTheSetting) {
  for (const char* bad : {"", "maybe", "2", "onn", "y"}) {
    const auto msg = what_of<ConfigError>([&] { parse_bool(bad, "read-only"); });
    EXPECT_THAT(msg, HasSubstr("read-only")) << "input '" << bad << "'";
  }
}

// ---------------------------------------------------------------- parse_seconds / parse_number

TEST(ParseSeconds, WholeAndDecimalSecondsToMilliseconds) {
  using std::chrono::milliseconds;
  EXPECT_EQ(parse_seconds("30", "x"), milliseconds(30000));
  EXPECT_EQ(parse_seconds("0.5", "x"), milliseconds(500));
  EXPECT_EQ(parse_seconds("2.5", "x", 0.1, 86400), milliseconds(2500));
  EXPECT_EQ(parse_seconds("0.0004", "x"), milliseconds(0));
  EXPECT_EQ(parse_seconds("1e3", "x"), milliseconds(1000000));
}

TEST(ParseSeconds, RejectsGarbageAndValuesOutOfRangeNamingBoth) {
  for (const char* bad : {"", "x", "5s", "-1", " 5", "inf", "nan", "0x10", "1,5"}) {
    const auto msg = what_of<ConfigError>([&] { parse_seconds(bad, "option io-timeout", 0.1, 86400); });
    EXPECT_THAT(msg, HasSubstr(std::string("option io-timeout='") + bad + "'")) << "input '" << bad << "'";
    EXPECT_THAT(msg, HasSubstr("expected seconds from 0.1 to 86400")) << msg;
  }
  EXPECT_THAT(what_of<ConfigError>([] { parse_seconds("0.05", "io-timeout", 0.1, 86400); }), HasSubstr("0.1 to 86400"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_seconds("86401", "io-timeout", 0.1, 86400); }), HasSubstr("86401"));
}

TEST(ParseNumber, DecimalAndOctalWithinBounds) {
  EXPECT_EQ(parse_number("64", "x", 1, 64), 64u);
  EXPECT_EQ(parse_number("0644", "x", 0, 07777, 8), 0644u);
  EXPECT_THAT(what_of<ConfigError>([] { parse_number("65", "connections", 1, 64); }),
              HasSubstr("connections='65': expected a number from 1 to 64"));
  EXPECT_THAT(what_of<ConfigError>([] { parse_number("0999", "mode", 0, 07777, 8); }), HasSubstr("octal"));
  for (const char* bad : {"", "-1", "1.5", "x", "12 "})
    EXPECT_THAT(what_of<ConfigError>([&] { parse_number(bad, "n", 0, 10); }), HasSubstr("n='")) << bad;
}

// ---------------------------------------------------------------- Options

const OptionSpec kTimeout{.name = "io-timeout", .kind = OptionKind::seconds, .help = "h", .min = 0.1, .max = 86400};
const OptionSpec kCount{.name = "connections", .kind = OptionKind::number, .help = "h", .min = 1, .max = 64};
const OptionSpec kKib{.name = "inflight-kib", .kind = OptionKind::number, .help = "h", .min = 0, .max = 1024,
                      .unit = "KiB"};
const OptionSpec kFlag{.name = "allow-other", .kind = OptionKind::flag, .help = "h", .aliases = {"allow_other"}};
const OptionSpec kWord{.name = "prefetch", .kind = OptionKind::choice, .help = "h",
                       .choices = {"off", "sequential", "hot-first", "on=sequential"}};
const OptionSpec kSize{.name = "readahead", .kind = OptionKind::size, .help = "h", .max = 64u << 20};

TEST(Options, EachReaderTakesItsOptionsAndFinishReportsTheRest) {
  std::map<std::string, std::string> values{{"io-timeout", "2.5"}, {"connections", "4"}, {"colour", "red"}};
  Options opts(values, "export 'vm1'");
  EXPECT_TRUE(opts.has(kTimeout));
  EXPECT_EQ(opts.seconds(kTimeout), std::chrono::milliseconds(2500));
  EXPECT_FALSE(opts.has(kTimeout)) << "taking an option removes it";
  EXPECT_EQ(opts.seconds(kTimeout), std::nullopt);
  EXPECT_EQ(opts.number(kCount), 4u);
  EXPECT_EQ(values.size(), 1u);
  const auto msg = what_of<ConfigError>([&] { opts.finish(); });
  EXPECT_THAT(msg, HasSubstr("export 'vm1': unknown option 'colour'"));
  EXPECT_THAT(msg, HasSubstr("io-timeout, connections")) << "lists what was asked for";
  values.clear();
  EXPECT_NO_THROW(opts.finish());
}

TEST(Options, ErrorsNameTheOptionTheValueAndWhere) {
  std::map<std::string, std::string> values{{"io-timeout", "x"}, {"connections", "0"}, {"inflight-kib", "2000"}};
  Options opts(values, "export 'vm1'");
  EXPECT_THAT(what_of<ConfigError>([&] { opts.seconds(kTimeout); }),
              HasSubstr("export 'vm1': option io-timeout='x': expected seconds from 0.1 to 86400"));
  EXPECT_THAT(what_of<ConfigError>([&] { opts.number(kCount); }), HasSubstr("option connections='0'"));
  EXPECT_THAT(what_of<ConfigError>([&] { opts.number(kKib); }), HasSubstr("inflight-kib='2000': expected KiB from 0 to 1024"));
  EXPECT_THAT(opts.error(kCount, "is odd").what(), HasSubstr("export 'vm1': option 'connections' is odd"));
}

TEST(Options, AliasesChoicesFlagsAndSizes) {
  std::map<std::string, std::string> values{{"allow_other", "yes"}, {"prefetch", "on"}, {"readahead", "1M"}};
  Options opts(values, "", "fuse option");
  EXPECT_EQ(opts.flag(kFlag), true);
  EXPECT_EQ(opts.choice(kWord), "sequential") << "a listed synonym";
  EXPECT_EQ(opts.size(kSize), 1u << 20);
  values = {{"prefetch", "fast"}, {"readahead", "1G"}, {"allow-other", "1"}, {"allow_other", "1"}};
  EXPECT_THAT(what_of<ConfigError>([&] { opts.choice(kWord); }),
              HasSubstr("prefetch 'fast' is not off, sequential or hot-first"));
  EXPECT_THAT(what_of<ConfigError>([&] { opts.size(kSize); }), HasSubstr("readahead='1G'"));
  EXPECT_THAT(what_of<ConfigError>([&] { opts.flag(kFlag); }), HasSubstr("given twice"));
  values = {{"bogus", "1"}};
  EXPECT_THAT(what_of<ConfigError>([&] { opts.finish(); }), HasSubstr("unknown fuse option 'bogus'"));
}

TEST(OptionSpec, HelpShowsTheValueTheRangeAndTheAliases) {
  EXPECT_EQ(kTimeout.usage(), "io-timeout=SECONDS");
  EXPECT_EQ(kTimeout.describe(), "h (0.1-86400)");
  EXPECT_EQ(kWord.usage(), "prefetch=off|sequential|hot-first");
  EXPECT_EQ(kFlag.usage(), "allow-other=on|off");
  EXPECT_EQ(kFlag.describe(), "h (also allow_other)");
  EXPECT_EQ(kSize.describe(), "h (at most 64M)");
  const OptionSpec with_default{.name = "n", .kind = OptionKind::number, .help = "h (default 2)", .min = 1, .max = 9};
  EXPECT_EQ(with_default.describe(), "h (default 2; 1-9)");
}

}  // namespace
}  // namespace blockway::core
