// AccessPolicy: who may use an export over NBD (allow=) and on which named
// listeners it is published (listen=). Parsed from the configuration or the
// control plane; evaluated once per handshake option that names the export.
//
// Pure value type, no threads: an Export holds the current policy as a
// shared_ptr<const AccessPolicy> that a run-time change replaces whole.
#pragma once

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace blockway::core {

// What is known about a client when it names an export.
struct AccessClient {
  std::string address;  // IPv4 or IPv6 literal; empty on a Unix socket or stdio
  std::optional<uid_t> uid;  // Unix socket peer (SO_PEERCRED)
  std::optional<gid_t> gid;
  std::vector<gid_t> groups;  // the peer's supplementary groups (SO_PEERGROUPS)
  // A verified client certificate's names: its CN, then its subject
  // alternative names (DNS, email, URI); cert: rules match any of them.
  std::vector<std::string> cert_names;
  std::string psk_name;   // TLS PSK identity
  std::string listener;   // name of the listener it came in on ("" = unnamed)
};

class AccessPolicy {
 public:
  // allow: entries separated by spaces or ';': an IPv4/IPv6 address or
  // CIDR (10.0.0.0/8, fd00::/8), cert:NAME, psk:NAME, user:NAME|UID,
  // group:NAME|GID (the peer's primary or supplementary groups as its
  // process holds them, not the group database). Empty: every client. listen: listener names separated
  // the same way; empty: every listener. Users and groups are resolved now.
  // Throws ConfigError naming the bad entry.
  static AccessPolicy parse(std::string_view allow, std::string_view listen);

  // Published on the client's listener, and (when allow= is set) the client
  // matches at least one entry.
  [[nodiscard]] bool allows(const AccessClient& client) const;
  [[nodiscard]] bool published_on(const std::string& listener) const;
  // A local user (the FUSE mount's callers): only the user:/group: entries
  // count; with none of them, everyone (the file's mode decides then).
  [[nodiscard]] bool allows_local_user(const AccessClient& client) const;
  [[nodiscard]] bool open() const noexcept { return allow_text_.empty() && listen_text_.empty(); }
  // Normalized texts (single spaces), for status and persistence.
  [[nodiscard]] const std::string& allow_text() const noexcept { return allow_text_; }
  [[nodiscard]] const std::string& listen_text() const noexcept { return listen_text_; }
  [[nodiscard]] const std::vector<std::string>& listeners() const noexcept { return listeners_; }
  // "allow=TEXT\nlisten=TEXT": how a run-time change is saved, and read back
  // by from_saved() (ConfigError if it is not that shape).
  [[nodiscard]] std::string saved() const { return "allow=" + allow_text_ + "\nlisten=" + listen_text_; }
  static AccessPolicy from_saved(std::string_view saved);

 private:
  struct Net {
    std::array<uint8_t, 16> bytes{};
    bool v6 = false;
    unsigned prefix = 0;
  };
  [[nodiscard]] bool matches_address(const std::string& address) const;
  [[nodiscard]] bool matches_unix(const AccessClient& client) const;

  std::vector<Net> nets_;
  std::vector<std::string> certs_, psks_, listeners_;
  std::vector<uid_t> uids_;
  std::vector<gid_t> gids_;
  std::string allow_text_, listen_text_;
};

}  // namespace blockway::core
