// Uri::parse: the parts of backend URIs, decoding, and errors.
#include "remote/uri.hpp"
#include "tests/support/refusals.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

namespace blockway::remote {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string parse_error(const std::string& text) {
  return test::what_of<std::invalid_argument>([&] { Uri::parse(text); });
}

// Every part of a Uri, to compare (and print) them all at once.
auto parts(const Uri& u) { return std::tie(u.scheme, u.user, u.host, u.port, u.path, u.query); }

// Uri::parse(text) gives exactly the parts of `want` (no query unless given).
void expect_parts(const std::string& text, const Uri& want) {
  const auto u = Uri::parse(text);
  EXPECT_EQ(parts(u), parts(want)) << text;
}

TEST(Uri, FileWithAbsolutePath) {
  expect_parts("file:///var/tmp/disk.img", {.scheme = "file", .path = "/var/tmp/disk.img"});
}

TEST(Uri, FileWithLocalhost) {
  expect_parts("file://localhost/p", {.scheme = "file", .host = "localhost", .path = "/p"});
}

TEST(Uri, NbdHostPortAndName) {
  expect_parts("nbd://storage.example:10809/exportname",
               {.scheme = "nbd", .host = "storage.example", .port = 10809, .path = "/exportname"});
}

TEST(Uri, HostWithoutPortOrPath) { expect_parts("nbd://server", {.scheme = "nbd", .host = "server"}); }

TEST(Uri, SchemeIsLowerCased) {
  EXPECT_EQ(Uri::parse("NBD+Unix://h/x").scheme, "nbd+unix");
}

TEST(Uri, BracketedIpv6WithAndWithoutPort) {
  expect_parts("nbd://[fe80::1]:10809/disk", {.scheme = "nbd", .host = "fe80::1", .port = 10809, .path = "/disk"});
  expect_parts("nbd://[::1]/disk", {.scheme = "nbd", .host = "::1", .path = "/disk"});
}

TEST(Uri, UserInfoIsPercentDecoded) {
  expect_parts("iscsi://ad%40min@target:3260/iqn.2024-01.x:disk/0",
               {.scheme = "iscsi", .user = "ad@min", .host = "target", .port = 3260, .path = "/iqn.2024-01.x:disk/0"});
}

TEST(Uri, LastAtSeparatesUserFromHost) {
  expect_parts("nfs://a@b@host/x", {.scheme = "nfs", .user = "a@b", .host = "host", .path = "/x"});
}

TEST(Uri, QueryParametersAreSplitAndDecoded) {
  const auto u = Uri::parse("nbd://h/x?tls=on&socket=%2Frun%2Fnbd.sock&flag&&empty=");
  const std::map<std::string, std::string> expected{
      {"tls", "on"}, {"socket", "/run/nbd.sock"}, {"flag", ""}, {"empty", ""}};
  EXPECT_EQ(u.query, expected);
  EXPECT_EQ(u.path, "/x");
}

TEST(Uri, QueryWithoutPath) {
  expect_parts("nbd://h:1?a=b", {.scheme = "nbd", .host = "h", .port = 1, .query = {{"a", "b"}}});
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
    // The message quotes the URI, masked: "u%@" reads as user "u" with an empty password.
    EXPECT_THAT(parse_error(bad), HasSubstr(redact_uri(bad))) << "the message quotes the URI";
  }
}

TEST(Uri, NotAUri) {
  for (const char* bad : {"", "/var/tmp/disk.img", "file:/x", "://host/x"})
    EXPECT_THAT(parse_error(bad), HasSubstr("not a URI")) << bad;
}

TEST(Uri, BadScheme) {
  test::expect_refusals(parse_error, {{"fi le:///x", "bad scheme"}, {"nbd_x://h", "bad scheme"}});
}

TEST(Uri, BadPorts) {
  for (const char* bad : {"nbd://h:0/x", "nbd://h:65536/x", "nbd://h:http/x", "nbd://h:-1/x", "nbd://h:1x/x",
                          "nbd://[::1]:0/x"}) {
    EXPECT_THAT(parse_error(bad), HasSubstr("bad port")) << bad;
    EXPECT_THAT(parse_error(bad), HasSubstr(bad));
  }
}

TEST(Uri, BadIpv6Brackets) {
  test::expect_refusals(parse_error, {{"nbd://[::1/x", "unclosed '['"}, {"nbd://[::1]x/y", "bad host"}});
}

TEST(Uri, UnbracketedIpv6IsRejected) {
  EXPECT_FALSE(parse_error("nbd://::1/x").empty());
  EXPECT_FALSE(parse_error("nbd://fe80::1:10809/x").empty());
}

TEST(Uri, EncodedNulIsRejected) {
  EXPECT_FALSE(parse_error("file:///var/tmp/a.img%00.bak").empty());
  EXPECT_FALSE(parse_error("nbd://h/x?socket=%00").empty());
}

TEST(Uri, RedactMasksAPasswordInAnyScheme) {
  EXPECT_EQ(redact_uri("iscsi://bob%s3cret@10.0.0.5:3260/iqn.2026-11.test:d/1"),
            "iscsi://bob%***@10.0.0.5:3260/iqn.2026-11.test:d/1");
  EXPECT_EQ(redact_uri("nfs://alice:pw@h/export/a.img?version=4"), "nfs://alice:***@h/export/a.img?version=4");
  // An '@' in the path or the query is not userinfo.
  EXPECT_EQ(redact_uri("rbd://admin@rbd/vm1@snap"), "rbd://admin@rbd/vm1@snap");
  EXPECT_EQ(redact_uri("nbd://h/x?tls-psk-user=a:b@c"), "nbd://h/x?tls-psk-user=a:b@c");
  EXPECT_EQ(redact_uri("file:///var/tmp/a@b.img"), "file:///var/tmp/a@b.img");
  // The last '@' of the authority ends the userinfo (a password may hold '@').
  EXPECT_EQ(redact_uri("iscsi://bob%p@ss@h/iqn.x:y/0"), "iscsi://bob%***@h/iqn.x:y/0");
  // Text that is not a URI, or cut short, is shown as given or masked, never thrown on.
  EXPECT_EQ(redact_uri("not a uri"), "not a uri");
  EXPECT_EQ(redact_uri("iscsi://bob%pw@"), "iscsi://bob%***@");
  EXPECT_EQ(redact_uri(""), "");
}

TEST(Uri, ParseErrorsNeverQuoteThePassword) {
  const auto e = parse_error("nfs://alice:s3cret@h:99999/x");
  EXPECT_THAT(e, HasSubstr("bad port"));
  EXPECT_THAT(e, HasSubstr("alice:***@h"));
  EXPECT_THAT(e, Not(HasSubstr("s3cret")));
}

}  // namespace
}  // namespace blockway::remote
