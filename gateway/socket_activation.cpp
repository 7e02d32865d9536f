#include "gateway/socket_activation.hpp"

#include "core/options.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/un.h>
#include <unistd.h>

#include <charconv>
#include <cstdlib>
#include <cstring>

namespace blockway::gateway {

using core::ConfigError;
using core::ListenAddress;

namespace {
constexpr int kFirstFd = 3;  // SD_LISTEN_FDS_START

long whole(const char* text, const char* what) {
  long v = 0;
  const char* end = text + std::strlen(text);
  auto [p, ec] = std::from_chars(text, end, v);
  if (ec != std::errc{} || p != end || v < 0) throw ConfigError(std::string(what) + " '" + text + "' is not a number");
  return v;
}

bool same_ip(const sockaddr* a, const sockaddr* b) {
  if (a->sa_family != b->sa_family) return false;
  if (a->sa_family == AF_INET)
    return reinterpret_cast<const sockaddr_in*>(a)->sin_addr.s_addr ==
           reinterpret_cast<const sockaddr_in*>(b)->sin_addr.s_addr;
  return std::memcmp(&reinterpret_cast<const sockaddr_in6*>(a)->sin6_addr,
                     &reinterpret_cast<const sockaddr_in6*>(b)->sin6_addr, sizeof(in6_addr)) == 0;
}

std::string describe(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "fd " + std::to_string(fd);
  char host[INET6_ADDRSTRLEN] = "";
  if (ss.ss_family == AF_UNIX) return "unix:" + std::string(reinterpret_cast<sockaddr_un*>(&ss)->sun_path);
  if (ss.ss_family == AF_INET) {
    auto* in = reinterpret_cast<sockaddr_in*>(&ss);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (ss.ss_family == AF_INET6) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  return "fd " + std::to_string(fd);
}
}  // namespace

std::vector<PassedSocket> parse_passed_sockets(const char* pid, const char* fds, const char* names, long self) {
  if (pid == nullptr || fds == nullptr) return {};
  if (whole(pid, "LISTEN_PID") != self) return {};  // meant for another process (our parent)
  const long n = whole(fds, "LISTEN_FDS");
  if (n > 4096) throw ConfigError("LISTEN_FDS '" + std::string(fds) + "' is too large");
  std::vector<std::string> labels;
  if (names != nullptr) {
    std::string_view rest(names);
    while (true) {
      const auto colon = rest.find(':');
      labels.emplace_back(rest.substr(0, colon));
      if (colon == std::string_view::npos) break;
      rest = rest.substr(colon + 1);
    }
    if (static_cast<long>(labels.size()) != n)
      throw ConfigError("LISTEN_FDNAMES names " + std::to_string(labels.size()) + " sockets, LISTEN_FDS " +
                        std::to_string(n));
  }
  std::vector<PassedSocket> out;
  for (long i = 0; i < n; ++i)
    out.push_back({kFirstFd + static_cast<int>(i), labels.empty() ? "" : labels[static_cast<size_t>(i)]});
  return out;
}

std::vector<PassedSocket> take_passed_sockets() {
  auto out = parse_passed_sockets(std::getenv("LISTEN_PID"), std::getenv("LISTEN_FDS"),
                                  std::getenv("LISTEN_FDNAMES"), static_cast<long>(::getpid()));
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  for (const auto& s : out) {
    const int flags = ::fcntl(s.fd, F_GETFD);
    if (flags < 0) throw ConfigError("LISTEN_FDS: fd " + std::to_string(s.fd) + " is not open");
    ::fcntl(s.fd, F_SETFD, flags | FD_CLOEXEC);  // not inherited by anything we start
  }
  return out;
}

bool socket_matches(const sockaddr* addr, socklen_t len, const ListenAddress& address) {
  if (address.kind == ListenAddress::Kind::unix_socket) {
    if (addr->sa_family != AF_UNIX || len <= offsetof(sockaddr_un, sun_path)) return false;
    const auto* un = reinterpret_cast<const sockaddr_un*>(addr);
    const size_t max = len - offsetof(sockaddr_un, sun_path);
    return std::string(un->sun_path, ::strnlen(un->sun_path, max)) == address.path;
  }
  if (addr->sa_family != AF_INET && addr->sa_family != AF_INET6) return false;
  const uint16_t port = addr->sa_family == AF_INET ? ntohs(reinterpret_cast<const sockaddr_in*>(addr)->sin_port)
                                                   : ntohs(reinterpret_cast<const sockaddr_in6*>(addr)->sin6_port);
  if (address.port == 0 || port != address.port) return false;
  addrinfo hints{};
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(address.port);
  // No host: every address (as Server::listen binds "::"), 0.0.0.0 or ::.
  if (::getaddrinfo(address.host.empty() ? nullptr : address.host.c_str(), service.c_str(), &hints, &found) != 0)
    return false;
  bool match = false;
  for (auto* ai = found; ai != nullptr && !match; ai = ai->ai_next) match = same_ip(ai->ai_addr, addr);
  ::freeaddrinfo(found);
  return match;
}

ListenPlan plan_listeners(const std::vector<ListenAddress>& configured, std::vector<PassedSocket> passed) {
  ListenPlan plan;
  if (configured.empty()) {
    plan.adopt = std::move(passed);
    return plan;
  }
  std::vector<bool> used(passed.size(), false);
  for (const auto& address : configured) {
    bool served = false;
    for (size_t i = 0; i < passed.size(); ++i) {
      sockaddr_storage ss{};
      socklen_t len = sizeof ss;
      if (used[i] || ::getsockname(passed[i].fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) continue;
      if (socket_matches(reinterpret_cast<sockaddr*>(&ss), len, address)) {
        used[i] = served = true;
        plan.adopt.push_back(passed[i]);
      }
    }
    if (!served) plan.bind.push_back(address);
  }
  for (size_t i = 0; i < passed.size(); ++i) {
    if (used[i]) continue;
    const std::string what = describe(passed[i].fd);
    for (const auto& p : passed) ::close(p.fd);
    throw ConfigError("socket " + what + " passed by systemd" +
                      (passed[i].name.empty() ? "" : " (" + passed[i].name + ")") +
                      " matches no listen address of the configuration; add it to 'listen' or remove it from the "
                      "socket unit");
  }
  return plan;
}

}  // namespace blockway::gateway
