// SystemdNotify: NOTIFY_SOCKET addresses (paths and abstract names), the
// WATCHDOG_USEC/WATCHDOG_PID rule, and datagrams received by a real socket.
#include "gateway/systemd_notify.hpp"

#include "tests/support/notify_receiver.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
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

TEST(SystemdNotifyTest, SendsToAnAbstractSocketAndClearsTheEnvironment) {
  test::NotifyReceiver r("notify-test");
  ASSERT_TRUE(r.bound());
  ::setenv("NOTIFY_SOCKET", r.notify_socket().c_str(), 1);
  ::setenv("WATCHDOG_USEC", "1000000", 1);
  ::setenv("WATCHDOG_PID", std::to_string(::getpid()).c_str(), 1);
  SystemdNotify n;
  EXPECT_TRUE(n.enabled());
  EXPECT_EQ(n.watchdog(), std::chrono::microseconds(1000000));
  EXPECT_EQ(std::getenv("NOTIFY_SOCKET"), nullptr);  // not inherited by children
  EXPECT_EQ(std::getenv("WATCHDOG_USEC"), nullptr);
  EXPECT_TRUE(n.send("READY=1\nSTATUS=up"));
  EXPECT_EQ(r.receive(5000), "READY=1\nSTATUS=up");
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
