#include "gateway/systemd_notify.hpp"

#include "core/logging.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>

namespace blockway::gateway {

namespace {
std::optional<unsigned long long> whole_number(const char* text) {
  if (text == nullptr || *text == '\0') return std::nullopt;
  unsigned long long v = 0;
  const char* end = text + std::strlen(text);
  auto [p, ec] = std::from_chars(text, end, v);
  if (ec != std::errc{} || p != end) return std::nullopt;
  return v;
}
}  // namespace

std::optional<std::string> SystemdNotify::socket_path(std::string_view value) {
  if (value.size() < 2 || value.size() >= sizeof(sockaddr_un::sun_path)) return std::nullopt;
  if (value.front() == '/') return std::string(value);
  if (value.front() == '@') return std::string(1, '\0') + std::string(value.substr(1));
  return std::nullopt;
}

std::optional<std::chrono::microseconds> SystemdNotify::watchdog_interval(const char* usec, const char* pid,
                                                                          long self) {
  const auto interval = whole_number(usec);
  if (!interval || *interval == 0) return std::nullopt;
  if (pid != nullptr) {  // unset: meant for us (sd_watchdog_enabled(3))
    const auto owner = whole_number(pid);
    if (!owner || *owner != static_cast<unsigned long long>(self)) return std::nullopt;
  }
  return std::chrono::microseconds(*interval);
}

SystemdNotify::SystemdNotify() {
  auto log = core::logger("systemd");
  watchdog_ = watchdog_interval(std::getenv("WATCHDOG_USEC"), std::getenv("WATCHDOG_PID"), ::getpid());
  const char* value = std::getenv("NOTIFY_SOCKET");
  if (value != nullptr) {
    if (auto path = socket_path(value)) {
      address_ = *path;
      fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
      if (fd_ < 0) log->warn("NOTIFY_SOCKET {}: cannot make a socket: {}", value, std::strerror(errno));
    } else {
      log->warn("NOTIFY_SOCKET '{}' is not a socket path or @name; not notifying systemd", value);
    }
  }
  if (!enabled()) watchdog_.reset();  // nobody to ping
  ::unsetenv("NOTIFY_SOCKET");
  ::unsetenv("WATCHDOG_USEC");
  ::unsetenv("WATCHDOG_PID");
}

SystemdNotify::~SystemdNotify() {
  if (fd_ >= 0) ::close(fd_);
}

bool SystemdNotify::send(std::string_view state) const {
  if (fd_ < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, address_.data(), address_.size());
  const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address_.size());
  ssize_t n;
  do {
    n = ::sendto(fd_, state.data(), state.size(), MSG_NOSIGNAL, reinterpret_cast<const sockaddr*>(&addr), len);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) return true;
  if (!warned_.exchange(true)) {  // once: the service manager may be gone for good
    core::logger("systemd")->warn("cannot notify systemd: {}", std::strerror(errno));
  }
  return false;
}

}  // namespace blockway::gateway
