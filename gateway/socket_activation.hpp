// Socket activation (sd_listen_fds(3)): listening sockets that systemd (or
// systemd-socket-activate) opened and passed as fds 3.., described by
// LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES. Clients connect to them while
// the daemon starts or restarts; the kernel queues them until it accepts.
//
// The rule: each passed socket serves the configured listen address it
// matches (same TCP address and port, or the same Unix socket path), and the
// daemon binds only the configured addresses no passed socket matches. With
// no listen address configured, the passed sockets are the listeners (and
// the default 127.0.0.1:10809 is not added). A passed socket that matches no
// configured address is a configuration mistake.
//
// Start-up only, main thread.
#pragma once

#include "core/listen_address.hpp"

#include <sys/socket.h>

#include <string>
#include <vector>

namespace blockway::gateway {

struct PassedSocket {
  int fd = -1;
  std::string name;  // from LISTEN_FDNAMES ("blockwayd.socket" by default), or ""
};

// The sockets passed to this process, with FD_CLOEXEC set; the variables
// are removed from the environment. Empty when LISTEN_PID is not this
// process. Throws core::ConfigError when the variables are malformed.
std::vector<PassedSocket> take_passed_sockets();
// The same from the variables' text, for tests (`self`: this process's pid).
std::vector<PassedSocket> parse_passed_sockets(const char* pid, const char* fds, const char* names, long self);

// Whether the socket bound to `addr` is the one `address` asks for.
bool socket_matches(const sockaddr* addr, socklen_t len, const core::ListenAddress& address);

struct ListenPlan {
  std::vector<core::ListenAddress> bind;  // configured, with no passed socket
  std::vector<PassedSocket> adopt;        // passed sockets to accept on
};
// Applies the rule above. Throws core::ConfigError naming a passed socket
// that matches nothing (it is closed first).
ListenPlan plan_listeners(const std::vector<core::ListenAddress>& configured, std::vector<PassedSocket> passed);

}  // namespace blockway::gateway
