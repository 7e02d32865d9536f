// Uri::parse: the parts of backend URIs, decoding, and errors.
#include "remote/uri.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

namespace blockway::remote {
namespace {

using ::testing::HasSubstr;

std::string parse_error(const std::string& text) {
  return test::what_of<std::invalid_argument>([&] { Uri::parse(text); });
}

TEST(Uri, FileWithAbsolutePath) {
  const auto u = Uri::parse("file:///var/tmp/disk.img");
  EXPECT_EQ(u.scheme, "file");
  EXPECT_EQ(u.user, "");
  EXPECT_EQ(u.host, "");
  EXPECT_FALSE(u.port.has_value());
  EXPECT_EQ(u.path, "/var/tmp/disk.img");
  EXPECT_TRUE(u.query.empty());
}

TEST(Uri, FileWithLocalhost) {
  const auto u = Uri::parse("file://localhost/p");
  EXPECT_EQ(u.host, "localhost");
  EXPECT_EQ(u.path, "/p");
}

TEST(Uri, NbdHostPortAndName) {
  const auto u = Uri::parse("nbd://storage.example:10809/exportname");
  EXPECT_EQ(u.scheme, "nbd");
  EXPECT_EQ(u.host, "storage.example");
  ASSERT_TRUE(u.port.has_value());
  EXPECT_EQ(*u.port, 10809);
  EXPECT_EQ(u.path, "/exportname");
}

TEST(Uri, HostWithoutPortOrPath) {
  const auto u = Uri::parse("nbd://server");
  EXPECT_EQ(u.host, "server");
  EXPECT_FALSE(u.port.has_value());
  EXPECT_EQ(u.path, "");
}

TEST(Uri, SchemeIsLowerCased) {
  EXPECT_EQ(Uri::parse("NBD+Unix://h/x").scheme, "nbd+unix");
}

TEST(Uri, BracketedIpv6WithAndWithoutPort) {
  const auto u = Uri::parse("nbd://[fe80::1]:10809/disk");
  EXPECT_EQ(u.host, "fe80::1");
  EXPECT_EQ(u.port, std::optional<uint16_t>(10809));
  EXPECT_EQ(u.path, "/disk");
  const auto v = Uri::parse("nbd://[::1]/disk");
  EXPECT_EQ(v.host, "::1");
  EXPECT_FALSE(v.port.has_value());
}

TEST(Uri, UserInfoIsPercentDecoded) {
  const auto u = Uri::parse("iscsi://ad%40min@target:3260/iqn.2024-01.x:disk/0");
  EXPECT_EQ(u.user, "ad@min");
  EXPECT_EQ(u.host, "target");
  EXPECT_EQ(u.port, std::optional<uint16_t>(3260));
  EXPECT_EQ(u.path, "/iqn.2024-01.x:disk/0");
}

TEST(Uri, LastAtSeparatesUserFromHost) {
  const auto u = Uri::parse("nfs://a@b@host/x");
  EXPECT_EQ(u.user, "a@b");
  EXPECT_EQ(u.host, "host");
}

TEST(Uri, QueryParametersAreSplitAndDecoded) {
  const auto u = Uri::parse("nbd://h/x?tls=on&socket=%2Frun%2Fnbd.sock&flag&&empty=");
  const std::map<std::string, std::string> expected{
      {"tls", "on"}, {"socket", "/run/nbd.sock"}, {"flag", ""}, {"empty", ""}};
  EXPECT_EQ(u.query, expected);
  EXPECT_EQ(u.path, "/x");
}

TEST(Uri, QueryWithoutPath) {
  const auto u = Uri::parse("nbd://h:1?a=b");
  EXPECT_EQ(u.host, "h");
  EXPECT_EQ(u.port, std::optional<uint16_t>(1));
  EXPECT_EQ(u.path, "");
  EXPECT_EQ(u.query.at("a"), "b");
}

TEST(Uri, PathIsPercentDecoded) {
  EXPECT_EQ(Uri::parse("file:///var/tmp/my%20disk%2B1.img").path, "/var/tmp/my disk+1.img");
  EXPECT_EQ(Uri::parse("file:///a%2fb%2Fc").path, "/a/b/c");
  EXPECT_EQ(Uri::parse("file:///x%41").path, "/xA");  // escape at the very end
}

TEST(Uri, BadPercentEscapes) {
  for (const char* bad : {"file:///a%", "file:///a%2", "file:///a%zz", "file:///a%g0", "nbd://u%@h/x",
                          "nbd://h/x?a=%4"}) {
    EXPECT_THAT(parse_error(bad), HasSubstr("percent")) << bad;
    EXPECT_THAT(parse_error(bad), HasSubstr(bad)) << "the message quotes the URI";
  }
}

TEST(Uri, NotAUri) {
  for (const char* bad : {"", "/var/tmp/disk.img", "file:/x", "://host/x"})
    EXPECT_THAT(parse_error(bad), HasSubstr("not a URI")) << bad;
}

TEST(Uri, BadScheme) {
  EXPECT_THAT(parse_error("fi le:///x"), HasSubstr("bad scheme"));
  EXPECT_THAT(parse_error("nbd_x://h"), HasSubstr("bad scheme"));
}

TEST(Uri, BadPorts) {
  for (const char* bad : {"nbd://h:0/x", "nbd://h:65536/x", "nbd://h:http/x", "nbd://h:-1/x", "nbd://h:1x/x",
                          "nbd://[::1]:0/x"}) {
    EXPECT_THAT(parse_error(bad), HasSubstr("bad port")) << bad;
    EXPECT_THAT(parse_error(bad), HasSubstr(bad));
  }
}

TEST(Uri, BadIpv6Brackets) {
  EXPECT_THAT(parse_error("nbd://[::1/x"), HasSubstr("unclosed '['"));
  EXPECT_THAT(parse_error("nbd://[::1]x/y"), HasSubstr("bad host"));
}

TEST(Uri, UnbracketedIpv6IsRejected) {
  EXPECT_FALSE(parse_error("nbd://::1/x").empty());
  EXPECT_FALSE(parse_error("nbd://fe80::1:10809/x").empty());
}

TEST(Uri, EncodedNulIsRejected) {
  EXPECT_FALSE(parse_error("file:///var/tmp/a.img%00.bak").empty());
  EXPECT_FALSE(parse_error("nbd://h/x?socket=%00").empty());
}

}  // namespace
}  // namespace blockway::remote
