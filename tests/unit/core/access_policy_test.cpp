// Unit tests for core/access_policy: the allow= and listen= rules.
#include "core/access_policy.hpp"

#include "core/options.hpp"

#include <gtest/gtest.h>

namespace blockway::core {
namespace {

AccessClient tcp(const std::string& address, const std::string& listener = "") {
  return AccessClient{.address = address, .listener = listener};
}

TEST(AccessPolicy, NoRulesLetEveryoneIn) {
  const auto p = AccessPolicy::parse("", "");
  EXPECT_TRUE(p.open());
  EXPECT_TRUE(p.allows(tcp("192.0.2.1")));
  EXPECT_TRUE(p.allows(AccessClient{.uid = 1000u}));
}

TEST(AccessPolicy, MatchesAddressesByPrefix) {
  const auto p = AccessPolicy::parse("127.0.0.1; 10.0.0.0/8  fd00::/8 ::1 192.168.1.128/25", "");
  EXPECT_EQ(p.allow_text(), "127.0.0.1 10.0.0.0/8 fd00::/8 ::1 192.168.1.128/25");
  EXPECT_TRUE(p.allows(tcp("127.0.0.1")));
  EXPECT_FALSE(p.allows(tcp("127.0.0.2")));
  EXPECT_TRUE(p.allows(tcp("10.255.1.2")));
  EXPECT_FALSE(p.allows(tcp("11.0.0.1")));
  EXPECT_TRUE(p.allows(tcp("192.168.1.129")));
  EXPECT_FALSE(p.allows(tcp("192.168.1.127")));
  EXPECT_TRUE(p.allows(tcp("fd12:3456::1")));
  EXPECT_TRUE(p.allows(tcp("::1")));
  EXPECT_FALSE(p.allows(tcp("fe80::1")));
  EXPECT_FALSE(p.allows(tcp("")));  // a Unix socket or stdio client has no address
  EXPECT_FALSE(p.allows(AccessClient{.uid = 0u}));
}

TEST(AccessPolicy, ZeroPrefixMatchesItsFamilyOnly) {
  const auto p = AccessPolicy::parse("0.0.0.0/0", "");
  EXPECT_TRUE(p.allows(tcp("203.0.113.9")));
  EXPECT_FALSE(p.allows(tcp("2001:db8::1")));
}

TEST(AccessPolicy, TlsNamesAreKeptApart) {
  const auto p = AccessPolicy::parse("cert:alice psk:bob", "");
  EXPECT_TRUE(p.allows(AccessClient{.cert_names = {"alice"}}));
  EXPECT_FALSE(p.allows(AccessClient{.psk_name = "alice"}));
  EXPECT_TRUE(p.allows(AccessClient{.psk_name = "bob"}));
  EXPECT_FALSE(p.allows(AccessClient{.cert_names = {"bob"}}));
}

TEST(AccessPolicy, CertRulesMatchAnyNameOfTheCertificate) {
  // CN first, then the subject alternative names: any one of them counts.
  const auto p = AccessPolicy::parse("cert:vm7.example.org cert:ops@example.org", "");
  EXPECT_TRUE(p.allows(AccessClient{.cert_names = {"alice", "vm7.example.org"}}));
  EXPECT_TRUE(p.allows(AccessClient{.cert_names = {"bob", "x.example.org", "ops@example.org"}}));
  EXPECT_FALSE(p.allows(AccessClient{.cert_names = {"alice", "vm8.example.org", "spiffe://example.org/vm7"}}));
  EXPECT_FALSE(p.allows(AccessClient{.cert_names = {}}));
  // A PSK identity is not a certificate name.
  EXPECT_FALSE(p.allows(AccessClient{.psk_name = "vm7.example.org"}));
}

TEST(AccessPolicy, UnixUsersAndGroupsByNameOrNumber) {
  const auto p = AccessPolicy::parse("user:root group:4242 user:65000", "");
  EXPECT_TRUE(p.allows(AccessClient{.uid = 0u, .gid = 0u}));
  EXPECT_TRUE(p.allows(AccessClient{.uid = 65000u, .gid = 1u}));
  EXPECT_TRUE(p.allows(AccessClient{.uid = 64000u, .gid = 4242u}));  // primary group
  EXPECT_FALSE(p.allows(AccessClient{.uid = 64000u, .gid = 64000u}));
  // A supplementary group of the peer process (SO_PEERGROUPS) counts too.
  EXPECT_TRUE(p.allows(AccessClient{.uid = 64000u, .gid = 64000u, .groups = {7u, 4242u}}));
  EXPECT_FALSE(p.allows(AccessClient{.uid = 64000u, .gid = 64000u, .groups = {7u, 8u}}));
  // A TCP client from anywhere is not a Unix user.
  EXPECT_FALSE(p.allows(tcp("127.0.0.1")));
}

TEST(AccessPolicy, ListenersPublishOnlyWhereNamed) {
  const auto p = AccessPolicy::parse("", "inner;backup");
  EXPECT_FALSE(p.open());
  EXPECT_TRUE(p.allows(tcp("192.0.2.1", "inner")));
  EXPECT_TRUE(p.allows(tcp("192.0.2.1", "backup")));
  EXPECT_FALSE(p.allows(tcp("192.0.2.1", "")));
  EXPECT_FALSE(p.allows(tcp("192.0.2.1", "public")));
  // Both conditions hold together.
  const auto q = AccessPolicy::parse("10.0.0.0/8", "inner");
  EXPECT_FALSE(q.allows(tcp("192.0.2.1", "inner")));
  EXPECT_FALSE(q.allows(tcp("10.0.0.1", "")));
  EXPECT_TRUE(q.allows(tcp("10.0.0.1", "inner")));
}

TEST(AccessPolicy, SavedFormRoundTrips) {
  const auto p = AccessPolicy::parse("10.0.0.0/8 cert:a", "inner");
  EXPECT_EQ(p.saved(), "allow=10.0.0.0/8 cert:a\nlisten=inner");
  const auto q = AccessPolicy::from_saved(p.saved());
  EXPECT_EQ(q.allow_text(), p.allow_text());
  EXPECT_EQ(q.listen_text(), p.listen_text());
  EXPECT_TRUE(AccessPolicy::from_saved("allow=\nlisten=").open());
  EXPECT_THROW(AccessPolicy::from_saved("garbage"), ConfigError);
}

TEST(AccessPolicy, MistakesNameTheEntry) {
  const auto what = [](const char* allow, const char* listen = "") {
    try {
      (void)AccessPolicy::parse(allow, listen);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(what("300.1.1.1").find("'300.1.1.1': not an IP address"), std::string::npos);
  EXPECT_NE(what("10.0.0.0/33").find("prefix length must be 0 to 32"), std::string::npos);
  EXPECT_NE(what("::/129").find("0 to 128"), std::string::npos);
  EXPECT_NE(what("10.0.0.0/x").find("prefix length"), std::string::npos);
  EXPECT_NE(what("cert:").find("name is empty"), std::string::npos);
  EXPECT_NE(what("user:no-such-user-here").find("no such user"), std::string::npos);
  EXPECT_NE(what("group:no-such-group-here").find("no such group"), std::string::npos);
  EXPECT_NE(what("", "127.0.0.1:10809").find("a listener name"), std::string::npos);
}

TEST(AccessPolicy, LocalUsersSeeOnlyTheUserAndGroupEntries) {
  // Addresses, certificates and listeners say nothing about a local user.
  EXPECT_TRUE(AccessPolicy::parse("127.0.0.1 cert:a", "inner").allows_local_user(AccessClient{.uid = 5u}));
  const auto p = AccessPolicy::parse("10.0.0.0/8 user:65000 group:4242", "");
  EXPECT_TRUE(p.allows_local_user(AccessClient{.uid = 65000u, .gid = 1u}));
  EXPECT_TRUE(p.allows_local_user(AccessClient{.uid = 1u, .gid = 1u, .groups = {4242u}}));
  EXPECT_FALSE(p.allows_local_user(AccessClient{.uid = 1u, .gid = 1u, .groups = {2u}}));
  EXPECT_FALSE(p.allows_local_user(AccessClient{.address = "10.0.0.1"}));
}

}  // namespace
}  // namespace blockway::core
