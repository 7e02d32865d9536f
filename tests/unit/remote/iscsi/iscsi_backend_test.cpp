// The iscsi:// backend: what check() accepts without a network, and the
// messages for what it refuses.
#include "remote/iscsi/iscsi_backend.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>

namespace blockway::remote::iscsi {
namespace {

using ::testing::HasSubstr;

std::string check_error(const std::string& uri, std::map<std::string, std::string> values = {}) {
  core::Options options(values);
  return test::what_of<core::ConfigError>([&] { kBackend.check(uri, options); });
}

TEST(IscsiBackend, CheckValidatesWithoutConnecting) {
  // Nothing listens on port 1: check() must not try.
  EXPECT_EQ(check_error("iscsi://127.0.0.1:1/iqn.2026-11.test:disk1/1"), "");
  EXPECT_EQ(check_error("iscsi://u%p@127.0.0.1:1/iqn.2026-11.test:disk1/1",
                        {{"sessions", "4"}, {"io-timeout", "2.5"}, {"initiator", "iqn.2026-11.test:me"}}),
            "");
  EXPECT_THAT(check_error("iscsi://127.0.0.1/iqn.x"), HasSubstr("no LUN"));
  EXPECT_THAT(check_error("iscsi://127.0.0.1/iqn.x/1", {{"sessions", "0"}}), HasSubstr("sessions='0'"));
  EXPECT_THAT(check_error("iscsi://127.0.0.1/iqn.x/1", {{"sessions", "65"}}), HasSubstr("from 1 to 64"));
  EXPECT_THAT(check_error("iscsi://127.0.0.1/iqn.x/1", {{"io-timeout", "soon"}}), HasSubstr("io-timeout='soon'"));
  EXPECT_THAT(check_error("iscsi://127.0.0.1/iqn.x/1", {{"io-timeout", "0"}}), HasSubstr("from 0.1 to 86400"));
  EXPECT_THAT(check_error("iscsi://127.0.0.1/iqn.x/1", {{"initiator", "me"}}), HasSubstr("initiator='me'"));
  EXPECT_THAT(check_error("iscsi://127.0.0.1/iqn.x/1", {{"write-same", "maybe"}}), HasSubstr("write-same='maybe'"));
}

TEST(IscsiBackend, OptionsAreParsedAndTaken) {
  std::map<std::string, std::string> values{{"sessions", "2"}, {"inflight-kib", "0"}, {"other", "x"}};
  core::Options options(values);
  const auto o = take_options(options);
  EXPECT_EQ(o.sessions, 2u);
  EXPECT_EQ(o.inflight_bytes, common::kUnboundedInflight);
  EXPECT_EQ(values.size(), 1u);
  EXPECT_TRUE(o.write_same);  // on unless turned off
}

TEST(IscsiBackend, WriteSameCanBeTurnedOff) {
  for (const char* off : {"off", "no", "0", "false"}) {
    std::map<std::string, std::string> values{{"write-same", off}};
    core::Options options(values);
    EXPECT_FALSE(take_options(options).write_same) << off;
    EXPECT_TRUE(values.empty());
  }
  std::map<std::string, std::string> values{{"write-same", "on"}};
  core::Options options(values);
  EXPECT_TRUE(take_options(options).write_same);
}

}  // namespace
}  // namespace blockway::remote::iscsi
