// Socket activation: LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, matching passed
// sockets (real bound sockets) to listen addresses, and the plan's rule.
#include "gateway/socket_activation.hpp"

#include "core/options.hpp"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <fcntl.h>

#include <cstring>
#include <string>

namespace blockway::gateway {
namespace {

using core::ConfigError;
using core::ListenAddress;

TEST(SocketActivationTest, Environment) {
  EXPECT_TRUE(parse_passed_sockets(nullptr, nullptr, nullptr, 7).empty());
  EXPECT_TRUE(parse_passed_sockets("8", "2", nullptr, 7).empty());  // our parent's
  auto two = parse_passed_sockets("7", "2", nullptr, 7);
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[0].fd, 3);
  EXPECT_EQ(two[1].fd, 4);
  EXPECT_EQ(two[1].name, "");
  auto named = parse_passed_sockets("7", "2", "tcp:unix", 7);
  EXPECT_EQ(named[0].name, "tcp");
  EXPECT_EQ(named[1].name, "unix");
  EXPECT_THROW(parse_passed_sockets("7", "2", "one", 7), ConfigError);
  EXPECT_THROW(parse_passed_sockets("7", "two", nullptr, 7), ConfigError);
  EXPECT_THROW(parse_passed_sockets("x", "2", nullptr, 7), ConfigError);
  EXPECT_THROW(parse_passed_sockets("7", "-1", nullptr, 7), ConfigError);
}

// A listening TCP socket on 127.0.0.1, port chosen by the kernel.
struct Tcp {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  uint16_t port = 0;
  explicit Tcp(const char* ip = "127.0.0.1") {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    ::inet_pton(AF_INET, ip, &a.sin_addr);
    EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(::listen(fd, 4), 0);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
  }
};

struct Unix {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  std::string path = "/tmp/blockway-sa-test-" + std::to_string(::getpid()) + ".sock";
  Unix() {
    ::unlink(path.c_str());
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
    EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(::listen(fd, 4), 0);
  }
  ~Unix() { ::unlink(path.c_str()); }
};

bool matches(int fd, const std::string& address) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len), 0);
  return socket_matches(reinterpret_cast<sockaddr*>(&ss), len, ListenAddress::parse(address));
}

bool is_open(int fd) { return ::fcntl(fd, F_GETFD) >= 0; }

TEST(SocketActivationTest, Matching) {
  Tcp tcp;
  Tcp any("0.0.0.0");
  Unix un;
  const auto p = std::to_string(tcp.port);
  EXPECT_TRUE(matches(tcp.fd, "127.0.0.1:" + p));
  EXPECT_TRUE(matches(tcp.fd, "localhost:" + p));
  EXPECT_FALSE(matches(tcp.fd, "127.0.0.2:" + p));
  EXPECT_FALSE(matches(tcp.fd, "127.0.0.1:" + std::to_string(tcp.port + 1)));
  EXPECT_FALSE(matches(tcp.fd, ":" + p));  // every address: 0.0.0.0 or ::
  EXPECT_TRUE(matches(any.fd, ":" + std::to_string(any.port)));
  EXPECT_FALSE(matches(tcp.fd, "unix:" + un.path));
  EXPECT_TRUE(matches(un.fd, "unix:" + un.path));
  EXPECT_FALSE(matches(un.fd, "unix:" + un.path + "x"));
  EXPECT_FALSE(matches(un.fd, "127.0.0.1:" + p));
  for (int fd : {tcp.fd, any.fd, un.fd}) ::close(fd);
}

TEST(SocketActivationTest, PlanAdoptsMatchesAndBindsTheRest) {
  Tcp tcp;
  Unix un;
  const auto own = ListenAddress::parse("127.0.0.1:1");
  auto plan = plan_listeners({ListenAddress::parse("unix:" + un.path), own,
                              ListenAddress::parse("127.0.0.1:" + std::to_string(tcp.port))},
                             {{tcp.fd, "tcp"}, {un.fd, "unix"}});
  ASSERT_EQ(plan.adopt.size(), 2u);
  EXPECT_EQ(plan.adopt[0].name, "unix");
  EXPECT_EQ(plan.adopt[1].name, "tcp");
  ASSERT_EQ(plan.bind.size(), 1u);
  EXPECT_EQ(plan.bind[0].to_string(), own.to_string());
  ::close(tcp.fd);
  ::close(un.fd);
}

TEST(SocketActivationTest, WithNoListenAddressThePassedSocketsAreTheListeners) {
  Tcp tcp;
  auto plan = plan_listeners({}, {{tcp.fd, ""}});
  ASSERT_EQ(plan.adopt.size(), 1u);
  EXPECT_TRUE(plan.bind.empty());
  ::close(tcp.fd);
}

TEST(SocketActivationTest, APassedSocketMatchingNothingIsRefused) {
  Tcp tcp, other;
  try {
    (void)plan_listeners({ListenAddress::parse("127.0.0.1:" + std::to_string(tcp.port))},
                         {{tcp.fd, "a"}, {other.fd, "b"}});
    FAIL() << "accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), "socket 127.0.0.1:" + std::to_string(other.port) +
                                         " passed by systemd (b) matches no listen address of the configuration; "
                                         "add it to 'listen' or remove it from the socket unit");
  }
  EXPECT_FALSE(is_open(tcp.fd));  // closed, not leaked
  EXPECT_FALSE(is_open(other.fd));
}

}  // namespace
}  // namespace blockway::gateway
