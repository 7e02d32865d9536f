// NotifyReceiver: what systemd listens on for sd_notify(3) messages, for
// tests: a datagram socket bound to an abstract name, whose NOTIFY_SOCKET
// value is "@" + name().
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstring>
#include <string>

namespace blockway::test {

class NotifyReceiver {
 public:
  explicit NotifyReceiver(const std::string& tag)
      : fd_(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)),
        name_("blockway-" + tag + "-" + std::to_string(::getpid())) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path + 1, name_.data(), name_.size());
    bound_ = ::bind(fd_, reinterpret_cast<sockaddr*>(&addr),
                    static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name_.size())) == 0;
  }
  ~NotifyReceiver() { ::close(fd_); }
  NotifyReceiver(const NotifyReceiver&) = delete;
  NotifyReceiver& operator=(const NotifyReceiver&) = delete;

  [[nodiscard]] bool bound() const noexcept { return bound_; }
  [[nodiscard]] std::string notify_socket() const { return "@" + name_; }

  // The next datagram within `ms`, or "".
  std::string receive(int ms) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, ms) != 1) return "";
    char buf[512];
    const auto n = ::recv(fd_, buf, sizeof buf, 0);
    return n < 0 ? "" : std::string(buf, static_cast<size_t>(n));
  }
  // How many WATCHDOG=1 datagrams arrive during `d`.
  int pings(std::chrono::milliseconds d) {
    int n = 0;
    const auto end = std::chrono::steady_clock::now() + d;
    while (true) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      if (left.count() <= 0) return n;
      if (receive(static_cast<int>(left.count())) == "WATCHDOG=1") ++n;
    }
  }
  // Discards what has arrived.
  void drain() {
    while (!receive(0).empty()) {
    }
  }

 private:
  int fd_;
  std::string name_;
  bool bound_ = false;
};

}  // namespace blockway::test
