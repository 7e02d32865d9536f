// ListenAddress: where a server listens, as written in the configuration
// ("HOST:PORT", "[V6]:PORT", ":PORT", "unix:/path").
//
// Pure value type, no threads. Mistakes are ConfigError (core/options.hpp).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace blockway::core {

struct ListenAddress {
  enum class Kind { tcp, unix_socket };
  Kind kind = Kind::tcp;
  std::string host;  // tcp: IPv4/IPv6 literal or host name, without brackets
  uint16_t port = 0;
  std::string path;  // unix socket path
  std::string name;  // "NAME=ADDR": exports with listen=NAME are published here only

  // "HOST:PORT", "[V6]:PORT", ":PORT" (all addresses), "unix:/path", each
  // optionally prefixed by "NAME=".
  static ListenAddress parse(std::string_view text);
  [[nodiscard]] std::string to_string() const;
};

// socket-mode / socket-user / socket-group: given to every Unix socket the
// server binds, after bind and before listen (a connect() before listen() is
// refused, so no client gets in under the looser mode in between). Sockets
// passed by systemd keep what the socket unit set.
struct UnixSocketAccess {
  std::optional<mode_t> mode;
  std::optional<uid_t> uid;
  std::optional<gid_t> gid;
};

// What to add to the message of a bind() that failed with errno `err`: for a
// port below 1024 refused with EACCES, the capability it needs
// (CAP_NET_BIND_SERVICE) and how to grant it; empty otherwise.
std::string privileged_port_hint(uint16_t port, int err);

}  // namespace blockway::core
