// IscsiUri::parse: what a user may write, what is refused and with which
// words, all without a network.
#include "remote/iscsi/iscsi_uri.hpp"
#include "tests/support/refusals.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

namespace blockway::remote::iscsi {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string parse_error(const std::string& text) {
  return test::what_of<std::invalid_argument>([&] { IscsiUri::parse(text); });
}

TEST(IscsiUri, HostTargetAndLun) {
  const auto u = IscsiUri::parse("iscsi://10.0.0.5/iqn.2026-11.test:disk1/1");
  EXPECT_EQ(u.host, "10.0.0.5");
  EXPECT_EQ(u.port, 3260);
  EXPECT_EQ(u.target, "iqn.2026-11.test:disk1");
  EXPECT_EQ(u.lun, 1);
  EXPECT_EQ(u.user, "");
  EXPECT_EQ(u.password, "");
  EXPECT_EQ(u.portal(), "10.0.0.5:3260");
  EXPECT_EQ(u.redacted(), "iscsi://10.0.0.5:3260/iqn.2026-11.test:disk1/1");
}

TEST(IscsiUri, PortIpv6AndLunZero) {
  const auto u = IscsiUri::parse("iscsi://[::1]:13260/eui.0123456789abcdef/0");
  EXPECT_EQ(u.host, "::1");
  EXPECT_EQ(u.port, 13260);
  EXPECT_EQ(u.lun, 0);
  EXPECT_EQ(u.portal(), "[::1]:13260");
  EXPECT_EQ(IscsiUri::parse("iscsi://h:1/naa.5000/16383").lun, 16383);
}

TEST(IscsiUri, ChapUserAndPasswordAreSplitAtTheFirstPercentAndNeverShown) {
  const auto u = IscsiUri::parse("iscsi://bob%s3cr%et@host/iqn.2026-11.test:d/1");
  EXPECT_EQ(u.user, "bob");
  EXPECT_EQ(u.password, "s3cr%et");  // libiscsi's syntax: no percent-decoding
  EXPECT_EQ(u.redacted(), "iscsi://bob%***@host:3260/iqn.2026-11.test:d/1");
  EXPECT_THAT(u.redacted(), Not(HasSubstr("s3cr")));
}

TEST(IscsiUri, ErrorsSayWhatIsWrongAndHideThePassword) {
  test::expect_refusals(parse_error, {
      {"iscsi:///iqn.2026-11.test:d/1", "no host"},
      {"iscsi://h", "no target name and LUN"},
      {"iscsi://h/iqn.2026-11.test:d", "no LUN"},
      {"iscsi://h/iqn.2026-11.test:d/", "no LUN"},
      {"iscsi://h//1", "empty target name"},
      {"iscsi://h/disk1/1", "does not start with iqn., eui. or naa."},
      {"iscsi://h/iqn.x y/1", "not allowed in a target name"},
      {"iscsi://h/iqn.x/one", "LUN 'one' is not a number"},
      {"iscsi://h/iqn.x/-1", "is not a number from 0 to 16383"},
      {"iscsi://h/iqn.x/16384", "is not a number from 0 to 16383"},
      {"iscsi://h/iqn.x/1/2", "LUN '1/2'"},
      {"iscsi://h:0/iqn.x/1", "bad port"},
      {"iscsi://h:70000/iqn.x/1", "bad port"},
      {"iscsi://h:/iqn.x/1", "empty port"},
      {"iscsi://::1/iqn.x/1", "brackets"},
      {"iscsi://[::1/iqn.x/1", "unclosed '['"},
      {"iscsi://h/iqn.x/1?header_digest=crc32c", "query parameters"},
      {"iscsi://bob@h/iqn.x/1", "CHAP user 'bob' has no password"},
      {"iscsi://bob%@h/iqn.x/1", "has no password"},
      {"iscsi://%pw@h/iqn.x/1", "empty CHAP user name"},
      {"nbd://h/iqn.x/1", "not an iscsi:// URI"},
  });
  const std::string e = parse_error("iscsi://bob%hunter2@h/disk/1");
  EXPECT_THAT(e, HasSubstr("bob%***@h"));
  EXPECT_THAT(e, Not(HasSubstr("hunter2")));
  EXPECT_THAT(e, HasSubstr("expected iscsi://[user%password@]host[:port]/target-iqn/lun"));
}

}  // namespace
}  // namespace blockway::remote::iscsi
