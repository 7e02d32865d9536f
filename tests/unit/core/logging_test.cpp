// Logging: the JSON string escaping of --log-format json, the syslog
// priorities of the journal prefixes, and the JOURNAL_STREAM check.
#include "core/logging.hpp"

#include "core/options.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace blockway::core {
namespace {

std::string json(std::string_view text) {
  std::string out;
  append_json_string(out, text);
  return out;
}

TEST(LoggingTest, JsonStringsEscapeQuotesBackslashesAndControls) {
  EXPECT_EQ(json("plain"), "\"plain\"");
  EXPECT_EQ(json("a\"b\\c"), "\"a\\\"b\\\\c\"");
  EXPECT_EQ(json("l1\nl2\tx\r"), "\"l1\\nl2\\tx\\r\"");
  EXPECT_EQ(json(std::string("\x01\x1f\x7f", 3)), "\"\\u0001\\u001f\\u007f\"");
}

TEST(LoggingTest, JsonStringsKeepUtf8AndReplaceBrokenBytes) {
  EXPECT_EQ(json("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x92\xbe"), "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x92\xbe\"");
  EXPECT_EQ(json("\xff"), "\"\\ufffd\"");
  EXPECT_EQ(json("\xc3"), "\"\\ufffd\"");          // cut short at the end
  EXPECT_EQ(json("\xe2\x28\xa1"), "\"\\ufffd(\\ufffd\"");  // bad continuation
  EXPECT_EQ(json("\xc0\xaf"), "\"\\ufffd\\ufffd\"");       // overlong form
}

TEST(LoggingTest, SyslogPriorities) {
  EXPECT_EQ(syslog_priority(spdlog::level::critical), 2);
  EXPECT_EQ(syslog_priority(spdlog::level::err), 3);
  EXPECT_EQ(syslog_priority(spdlog::level::warn), 4);
  EXPECT_EQ(syslog_priority(spdlog::level::info), 6);
  EXPECT_EQ(syslog_priority(spdlog::level::debug), 7);
  EXPECT_EQ(syslog_priority(spdlog::level::trace), 7);
}

TEST(LoggingTest, LogFormats) {
  EXPECT_EQ(parse_log_format("text", "--log-format"), LogFormat::text);
  EXPECT_EQ(parse_log_format("json", "--log-format"), LogFormat::json);
  try {
    (void)parse_log_format("JSON", "log-format");
    FAIL() << "accepted JSON";
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "log-format 'JSON' is not one of text, json");
  }
}

TEST(LoggingTest, JournalStreamMustNameStderr) {
  struct stat st {};
  ASSERT_EQ(::fstat(2, &st), 0);
  const std::string mine = std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
  const char* old = std::getenv("JOURNAL_STREAM");
  const std::string saved = old ? old : "";
  ::setenv("JOURNAL_STREAM", mine.c_str(), 1);
  EXPECT_TRUE(stderr_is_journal());
  ::setenv("JOURNAL_STREAM", (std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino + 1)).c_str(), 1);
  EXPECT_FALSE(stderr_is_journal());
  ::setenv("JOURNAL_STREAM", (mine + "x").c_str(), 1);
  EXPECT_FALSE(stderr_is_journal());
  ::setenv("JOURNAL_STREAM", "garbage", 1);
  EXPECT_FALSE(stderr_is_journal());
  ::unsetenv("JOURNAL_STREAM");
  EXPECT_FALSE(stderr_is_journal());
  if (old) ::setenv("JOURNAL_STREAM", saved.c_str(), 1);
}

}  // namespace
}  // namespace blockway::core
