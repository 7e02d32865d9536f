// IscsiUri::parse: what a user may write, what is refused and with which
// words, all without a network.
#include "remote/iscsi/iscsi_uri.hpp"
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
  EXPECT_THAT(parse_error("iscsi:///iqn.2026-11.test:d/1"), HasSubstr("no host"));
  EXPECT_THAT(parse_error("iscsi://h"), HasSubstr("no target name and LUN"));
  EXPECT_THAT(parse_error("iscsi://h/iqn.2026-11.test:d"), HasSubstr("no LUN"));
  EXPECT_THAT(parse_error("iscsi://h/iqn.2026-11.test:d/"), HasSubstr("no LUN"));
  EXPECT_THAT(parse_error("iscsi://h//1"), HasSubstr("empty target name"));
  EXPECT_THAT(parse_error("iscsi://h/disk1/1"), HasSubstr("does not start with iqn., eui. or naa."));
  EXPECT_THAT(parse_error("iscsi://h/iqn.x y/1"), HasSubstr("not allowed in a target name"));
  EXPECT_THAT(parse_error("iscsi://h/iqn.x/one"), HasSubstr("LUN 'one' is not a number"));
  EXPECT_THAT(parse_error("iscsi://h/iqn.x/-1"), HasSubstr("is not a number from 0 to 16383"));
  EXPECT_THAT(parse_error("iscsi://h/iqn.x/16384"), HasSubstr("is not a number from 0 to 16383"));
  EXPECT_THAT(parse_error("iscsi://h/iqn.x/1/2"), HasSubstr("LUN '1/2'"));
  EXPECT_THAT(parse_error("iscsi://h:0/iqn.x/1"), HasSubstr("bad port"));
  EXPECT_THAT(parse_error("iscsi://h:70000/iqn.x/1"), HasSubstr("bad port"));
  EXPECT_THAT(parse_error("iscsi://h:/iqn.x/1"), HasSubstr("empty port"));
  EXPECT_THAT(parse_error("iscsi://::1/iqn.x/1"), HasSubstr("brackets"));
  EXPECT_THAT(parse_error("iscsi://[::1/iqn.x/1"), HasSubstr("unclosed '['"));
  EXPECT_THAT(parse_error("iscsi://h/iqn.x/1?header_digest=crc32c"), HasSubstr("query parameters"));
  EXPECT_THAT(parse_error("iscsi://bob@h/iqn.x/1"), HasSubstr("CHAP user 'bob' has no password"));
  EXPECT_THAT(parse_error("iscsi://bob%@h/iqn.x/1"), HasSubstr("has no password"));
  EXPECT_THAT(parse_error("iscsi://%pw@h/iqn.x/1"), HasSubstr("empty CHAP user name"));
  EXPECT_THAT(parse_error("nbd://h/iqn.x/1"), HasSubstr("not an iscsi:// URI"));
  const std::string e = parse_error("iscsi://bob%hunter2@h/disk/1");
  EXPECT_THAT(e, HasSubstr("bob%***@h"));
  EXPECT_THAT(e, Not(HasSubstr("hunter2")));
  EXPECT_THAT(e, HasSubstr("expected iscsi://[user%password@]host[:port]/target-iqn/lun"));
}

}  // namespace
}  // namespace blockway::remote::iscsi
