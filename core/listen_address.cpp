#include "core/listen_address.hpp"

#include "core/options.hpp"

#include <cerrno>
#include <charconv>

namespace blockway::core {

ListenAddress ListenAddress::parse(std::string_view text) {
  ListenAddress a;
  const std::string where = "listen address '" + std::string(text) + "'";
  // NAME=ADDR: a name is letters, digits, '-', '_', '.', before any ':' '[' or '/'.
  if (const auto eq = text.find('='); eq != std::string_view::npos && text.substr(0, eq).find_first_of(":[/") ==
                                                                          std::string_view::npos) {
    a.name = std::string(text.substr(0, eq));
    if (a.name.empty() || a.name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") !=
                              std::string::npos)
      throw ConfigError(where + ": a listener name is letters, digits, '-', '_' and '.'");
    auto rest = parse(text.substr(eq + 1));
    if (!rest.name.empty()) throw ConfigError(where + ": one name only");
    rest.name = a.name;
    return rest;
  }
  if (text.starts_with("unix:")) {
    a.kind = Kind::unix_socket;
    a.path = std::string(text.substr(5));
    if (a.path.empty() || a.path.front() != '/')
      throw ConfigError(where + ": a Unix socket needs an absolute path (unix:/run/x.sock)");
    if (a.path.size() >= 108) throw ConfigError(where + ": Unix socket path is too long");
    return a;
  }
  std::string_view host, port;
  if (text.starts_with("[")) {
    const auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      throw ConfigError(where + ": expected [IPV6]:PORT");
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) throw ConfigError(where + ": expected HOST:PORT");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos)
      throw ConfigError(where + ": write IPv6 addresses in brackets, [::1]:10809");
  }
  a.host = std::string(host);
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), a.port);
  if (ec != std::errc{} || end != port.data() + port.size())
    throw ConfigError(where + ": '" + std::string(port) + "' is not a valid number");
  return a;
}

std::string ListenAddress::to_string() const {
  if (kind == Kind::unix_socket) return "unix:" + path;
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

std::string privileged_port_hint(uint16_t port, int err) {
  if (err != EACCES || port == 0 || port >= 1024) return {};
  return ". Ports below 1024 need CAP_NET_BIND_SERVICE (or root): run blockwayd as root, grant it with "
         "AmbientCapabilities=CAP_NET_BIND_SERVICE in its systemd unit (see README, Running without root), "
         "or listen on a port above 1023";
}

}  // namespace blockway::core
