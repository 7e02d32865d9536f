// SystemdNotify: NOTIFY_SOCKET addresses (paths and abstract names), the
// WATCHDOG_USEC/WATCHDOG_PID rule, and datagrams received by a real socket.
#include "gateway/systemd_notify.hpp"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace blockway::gateway {
namespace {

TEST(SystemdNotifyTest, SocketPaths) {
  EXPECT_EQ(SystemdNotify::socket_path("/run/systemd/notify"), "/run/systemd/notify");
  EXPECT_EQ(SystemdNotify::socket_path("@sd-notify"), std::string("\0sd-notify", 10));
  EXPECT_FALSE(SystemdNotify::socket_path("relative"));
  EXPECT_FALSE(SystemdNotify::socket_path("@"));
  EXPECT_FALSE(SystemdNotify::socket_path(""));
  EXPECT_FALSE(SystemdNotify::socket_path("/" + std::string(200, 'x')));
}

TEST(SystemdNotifyTest, WatchdogInterval) {
  using std::chrono::microseconds;
  EXPECT_EQ(SystemdNotify::watchdog_interval("30000000", nullptr, 42), microseconds(30000000));
  EXPECT_EQ(SystemdNotify::watchdog_interval("500000", "42", 42), microseconds(500000));
  EXPECT_FALSE(SystemdNotify::watchdog_interval("500000", "41", 42));  // our parent's
  EXPECT_FALSE(SystemdNotify::watchdog_interval("0", nullptr, 42));
  EXPECT_FALSE(SystemdNotify::watchdog_interval("5s", nullptr, 42));
  EXPECT_FALSE(SystemdNotify::watchdog_interval("", nullptr, 42));
  EXPECT_FALSE(SystemdNotify::watchdog_interval(nullptr, "42", 42));
  EXPECT_FALSE(SystemdNotify::watchdog_interval("500000", "x", 42));
}

// A datagram socket bound to an abstract name, as systemd's would be.
struct Receiver {
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  std::string name = "blockway-notify-test-" + std::to_string(::getpid());
  Receiver() {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path + 1, name.data(), name.size());
    EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr),
                     static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size())),
              0);
  }
  ~Receiver() { ::close(fd); }
  std::string receive() {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 5000) != 1) return "(nothing)";
    char buf[512];
    const auto n = ::recv(fd, buf, sizeof buf, 0);
    return n < 0 ? "(error)" : std::string(buf, static_cast<size_t>(n));
  }
};

TEST(SystemdNotifyTest, SendsToAnAbstractSocketAndClearsTheEnvironment) {
  Receiver r;
  ::setenv("NOTIFY_SOCKET", ("@" + r.name).c_str(), 1);
  ::setenv("WATCHDOG_USEC", "1000000", 1);
  ::setenv("WATCHDOG_PID", std::to_string(::getpid()).c_str(), 1);
  SystemdNotify n;
  EXPECT_TRUE(n.enabled());
  EXPECT_EQ(n.watchdog(), std::chrono::microseconds(1000000));
  EXPECT_EQ(std::getenv("NOTIFY_SOCKET"), nullptr);  // not inherited by children
  EXPECT_EQ(std::getenv("WATCHDOG_USEC"), nullptr);
  EXPECT_TRUE(n.send("READY=1\nSTATUS=up"));
  EXPECT_EQ(r.receive(), "READY=1\nSTATUS=up");
}

TEST(SystemdNotifyTest, WithoutNotifySocketNothingIsSent) {
  ::unsetenv("NOTIFY_SOCKET");
  ::setenv("WATCHDOG_USEC", "1000000", 1);
  SystemdNotify n;
  EXPECT_FALSE(n.enabled());
  EXPECT_FALSE(n.watchdog());  // nobody to ping
  EXPECT_FALSE(n.send("READY=1"));
}

TEST(SystemdNotifyTest, AVanishedManagerIsAFailedSend) {
  ::setenv("NOTIFY_SOCKET", "@blockway-notify-test-nobody-listens", 1);
  SystemdNotify n;
  EXPECT_TRUE(n.enabled());
  EXPECT_FALSE(n.send("READY=1"));
  EXPECT_FALSE(n.send("READY=1"));  // warned once, still false
}

}  // namespace
}  // namespace blockway::gateway
