// Unit tests for core/listen_address: HOST:PORT, [V6]:PORT and unix:/path.
#include "core/listen_address.hpp"

#include "core/options.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cerrno>

#include <string>

namespace blockway::core {
namespace {

using ::testing::HasSubstr;
using test::what_of;

// ---------------------------------------------------------------- ListenAddress

// text parses as the TCP address host:port and prints back as text.
void expect_tcp(const std::string& text, const std::string& host, uint16_t port) {
  SCOPED_TRACE(text);
  const auto a = ListenAddress::parse(text);
  EXPECT_EQ(a.kind, ListenAddress::Kind::tcp);
  EXPECT_EQ(a.host, host);
  EXPECT_EQ(a.port, port);
  EXPECT_EQ(a.to_string(), text);
}

TEST(ListenAddress, Ipv4HostAndPort) { expect_tcp("127.0.0.1:10809", "127.0.0.1", 10809); }

TEST(ListenAddress, HostNameAndEmptyHost) {
  EXPECT_EQ(ListenAddress::parse("localhost:1").host, "localhost");
  const auto any = ListenAddress::parse(":10809");
  EXPECT_EQ(any.host, "");
  EXPECT_EQ(any.port, 10809);
  EXPECT_EQ(ListenAddress::parse("0.0.0.0:0").port, 0);
}

TEST(ListenAddress, BracketedIpv6) {
  expect_tcp("[::1]:10809", "::1", 10809);
  EXPECT_EQ(ListenAddress::parse("[fe80::1%eth0]:99").host, "fe80::1%eth0");
}

TEST(ListenAddress, UnixSocket) {
  const auto a = ListenAddress::parse("unix:/run/blockway.sock");
  EXPECT_EQ(a.kind, ListenAddress::Kind::unix_socket);
  EXPECT_EQ(a.path, "/run/blockway.sock");
  EXPECT_EQ(a.to_string(), "unix:/run/blockway.sock");
}

TEST(ListenAddress, Errors) {
  const std::string long_path = "unix:/" + std::string(120, 'a');
  const std::pair<std::string, std::string> cases[] = {
      {"unix:", "absolute path"},
      {"unix:relative.sock", "absolute path"},
      {long_path, "too long"},
      {"localhost", "HOST:PORT"},
      {"::1:10809", "brackets"},
      {"[::1]", "[IPV6]:PORT"},
      {"[::1]10809", "[IPV6]:PORT"},
      {"[::1", "[IPV6]:PORT"},
      {"host:", "not a valid number"},
      {"host:65536", "not a valid number"},
      {"host:http", "not a valid number"},
      {"host:-1", "not a valid number"},
  };
  for (const auto& [text, expect] : cases) {
    const std::string& input = text;  // Clang 14 cannot capture a structured binding
    const auto msg = what_of<ConfigError>([&] { ListenAddress::parse(input); });
    EXPECT_THAT(msg, HasSubstr(expect)) << "input '" << text << "'";
    EXPECT_THAT(msg, HasSubstr(text)) << "the message quotes the address";
  }
}

TEST(PrivilegedPortHint, NamesTheCapabilityForALowPortRefused) {
  const auto hint = privileged_port_hint(80, EACCES);
  EXPECT_NE(hint.find("CAP_NET_BIND_SERVICE"), std::string::npos);
  EXPECT_NE(hint.find("AmbientCapabilities=CAP_NET_BIND_SERVICE"), std::string::npos);
}

TEST(PrivilegedPortHint, SilentOtherwise) {
  EXPECT_EQ(privileged_port_hint(10809, EACCES), "");  // not a privileged port
  EXPECT_EQ(privileged_port_hint(80, EADDRINUSE), "");  // another cause
  EXPECT_EQ(privileged_port_hint(0, EACCES), "");       // any port
}

TEST(ListenAddress, NamedListeners) {
  const auto a = ListenAddress::parse("tenants=10.0.0.1:10809");
  EXPECT_EQ(a.name, "tenants");
  EXPECT_EQ(a.host, "10.0.0.1");
  EXPECT_EQ(a.port, 10809);
  const auto u = ListenAddress::parse("local=unix:/run/x.sock");
  EXPECT_EQ(u.name, "local");
  EXPECT_EQ(u.path, "/run/x.sock");
  EXPECT_EQ(ListenAddress::parse("[::1]:10809").name, "");
  EXPECT_THAT(what_of<ConfigError>([] { ListenAddress::parse("a b=1.2.3.4:5"); }), HasSubstr("listener name"));
  EXPECT_THAT(what_of<ConfigError>([] { ListenAddress::parse("=1.2.3.4:5"); }), HasSubstr("listener name"));
  EXPECT_THAT(what_of<ConfigError>([] { ListenAddress::parse("a=b=1.2.3.4:5"); }), HasSubstr("one name only"));
}

}  // namespace
}  // namespace blockway::core
