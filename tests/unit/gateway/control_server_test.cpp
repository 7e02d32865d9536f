// The control socket: its mode, group and lock file, one server per socket,
// stale sockets replaced and live ones never, lines in and out.
#include "gateway/control_server.hpp"

#include "tests/unit/gateway/control_fixture.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <gtest/gtest.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

namespace blockway::gateway {
namespace {

using namespace test_support;

int connect_to(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

void send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;  // the server may hang up mid-way (too-large)
    off += static_cast<size_t>(n);
  }
}

// Reads up to and including '\n'; "" on EOF before any byte.
std::string read_line(int fd) {
  std::string line;
  char c;
  while (::read(fd, &c, 1) == 1) {
    if (c == '\n') return line;
    line += c;
  }
  return line;
}

struct SocketFixture : Fixture {
  boost::asio::io_context ctx;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work;
  std::thread loop;
  std::string dir, path;
  std::unique_ptr<ControlServer> server;
  std::vector<std::unique_ptr<ControlServer>> more;  // stopped and destroyed after the loop ends

  void SetUp() override {
    Fixture::SetUp();
    char tmpl[] = "/tmp/blockway-control-test-XXXXXX";
    dir = ::mkdtemp(tmpl);
    path = dir + "/sub/control.sock";
    server = std::make_unique<ControlServer>(ctx, dispatcher);
    work.emplace(ctx.get_executor());
  }
  void start() {
    loop = std::thread([this] { ctx.run(); });
  }
  void TearDown() override {
    server->stop();
    for (auto& m : more) m->stop();
    work.reset();
    if (loop.joinable()) loop.join();
    server.reset();
    more.clear();
    std::filesystem::remove_all(dir);
  }
};

TEST_F(SocketFixture, SocketIsPrivateAndAnswersLines) {
  server->listen(path);
  start();
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  const int fd = connect_to(path);
  ASSERT_GE(fd, 0);
  // Two requests in one write, one with CRLF, blank lines ignored.
  send_all(fd, "{\"cmd\":\"list\"}\r\n\n{\"cmd\":\"nope\"}\n");
  EXPECT_EQ(Json::parse(read_line(fd))["ok"], true);
  EXPECT_EQ(Json::parse(read_line(fd))["error"]["code"], "unknown-command");
  // A last request without its newline is still answered.
  send_all(fd, "{\"cmd\":\"list\"}");
  ::shutdown(fd, SHUT_WR);
  EXPECT_EQ(Json::parse(read_line(fd))["ok"], true);
  EXPECT_EQ(read_line(fd), "");
  ::close(fd);
}

TEST_F(SocketFixture, HugeLineIsRefusedAndTheServerGoesOn) {
  server->listen(path);
  start();
  const int fd = connect_to(path);
  ASSERT_GE(fd, 0);
  send_all(fd, "{\"cmd\":\"" + std::string(kMaxControlRequest * 2, 'x'));
  const auto r = Json::parse(read_line(fd));
  EXPECT_EQ(r["error"]["code"], "too-large");
  EXPECT_EQ(read_line(fd), "") << "the connection is closed after a too-large line";
  ::close(fd);
  const int fd2 = connect_to(path);
  send_all(fd2, "{\"cmd\":\"status\"}\n");
  EXPECT_EQ(Json::parse(read_line(fd2))["ok"], true);
  ::close(fd2);
}

TEST_F(SocketFixture, ManyClientsAtOnce) {
  server->listen(path);
  start();
  std::vector<int> fds;
  for (int i = 0; i < 50; ++i) {
    fds.push_back(connect_to(path));
    ASSERT_GE(fds.back(), 0);
  }
  for (int fd : fds) send_all(fd, "{\"cmd\":\"status\"}\n");
  for (int fd : fds) {
    EXPECT_EQ(Json::parse(read_line(fd))["ok"], true);
    ::close(fd);
  }
}

TEST_F(SocketFixture, LiveSocketIsNeverTakenOverStaleOneIsReplaced) {
  server->listen(path);
  start();
  auto& second = *more.emplace_back(std::make_unique<ControlServer>(ctx, dispatcher));
  EXPECT_THROW(second.listen(path), std::runtime_error);
  EXPECT_TRUE(ControlServer::is_live(path));
  // A regular file is not ours to delete.
  const std::string file = dir + "/file";
  { std::ofstream(file) << "x"; }
  EXPECT_THROW(second.listen(file), std::runtime_error);
  EXPECT_TRUE(std::filesystem::exists(file));
  // A stale socket file (nobody listens) is replaced.
  const std::string stale = dir + "/stale.sock";
  {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, stale.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ::close(fd);
  }
  EXPECT_FALSE(ControlServer::is_live(stale));
  auto& third = *more.emplace_back(std::make_unique<ControlServer>(ctx, dispatcher));
  third.listen(stale, 0660);
  struct stat st {};
  ASSERT_EQ(::stat(stale.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_TRUE(ControlServer::is_live(stale));
  EXPECT_THROW(second.listen("relative.sock"), std::runtime_error);
}

// Whoever holds PATH.lock owns PATH: a second server is refused, naming the
// holder's pid, even where the socket looks stale (gone, or not answering:
// what two daemons starting at once could both see).
TEST_F(SocketFixture, OneServerPerSocketByItsLockFile) {
  server->listen(path);
  start();
  EXPECT_TRUE(std::filesystem::exists(path + ".lock"));
  const std::string refused = "another blockwayd is running on " + path + " (pid " + std::to_string(::getpid()) + ")";
  auto& second = *more.emplace_back(std::make_unique<ControlServer>(ctx, dispatcher));
  for (int round = 0; round < 2; ++round) {
    try {
      second.listen(path);
      ADD_FAILURE() << "round " << round << ": a second server listens on " << path;
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()), refused);
    }
    ::unlink(path.c_str());  // round 1: no socket at all at the path
  }
  EXPECT_TRUE(std::filesystem::exists(path + ".lock")) << "a refused server leaves the holder's lock file";
}

// A lock file planted as a hard link to another file is refused, and that
// file is neither truncated nor written (the daemon writes its pid there).
TEST_F(SocketFixture, ALockFileWithAnotherLinkIsRefusedAndLeftAlone) {
  const std::string victim = dir + "/victim";
  std::filesystem::create_directories(dir + "/sub");
  {
    std::ofstream(victim) << "precious\n";
  }
  ASSERT_EQ(::link(victim.c_str(), (path + ".lock").c_str()), 0) << std::strerror(errno);
  try {
    server->listen(path);
    ADD_FAILURE() << "listened with a hard-linked lock file";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("refusing the lock file " + path + ".lock"), std::string::npos) << e.what();
  }
  std::ifstream in(victim);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "precious\n");
  EXPECT_TRUE(std::filesystem::exists(path + ".lock")) << "the planted file is not ours to remove";
}

// The socket appears at its path complete: it is never created there and its
// mode is never changed through that path (a chmod() after bind() follows a
// symlink swapped into the directory in between), and the process umask is
// left alone (other threads create files meanwhile).
TEST_F(SocketFixture, SocketAppearsWithItsModeAndIsNeverChmodedInPlace) {
  std::filesystem::create_directories(dir + "/sub");
  const int in = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  ASSERT_GE(in, 0);
  ASSERT_GE(::inotify_add_watch(in, (dir + "/sub").c_str(), IN_CREATE | IN_ATTRIB | IN_MOVED_TO), 0);
  const mode_t umask_before = ::umask(022);
  ::umask(umask_before);
  server->listen(path, 0640);
  const mode_t umask_after = ::umask(022);
  ::umask(umask_after);
  EXPECT_EQ(umask_after, umask_before);
  start();
  std::vector<std::string> events;
  alignas(inotify_event) char buf[4096];
  for (ssize_t n; (n = ::read(in, buf, sizeof buf)) > 0;) {
    for (char* p = buf; p < buf + n;) {
      const auto* ev = reinterpret_cast<const inotify_event*>(p);
      const std::string name = ev->len ? ev->name : "";
      if (name == "control.sock") {
        if (ev->mask & IN_CREATE) events.push_back("create");
        if (ev->mask & IN_ATTRIB) events.push_back("attrib");
        if (ev->mask & IN_MOVED_TO) events.push_back("moved-to");
      }
      p += sizeof(inotify_event) + ev->len;
    }
  }
  ::close(in);
  EXPECT_EQ(events, std::vector<std::string>{"moved-to"}) << "bound elsewhere, then renamed into place";
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0640u);
  // Nothing is left of the private directory.
  for (const auto& e : std::filesystem::directory_iterator(dir + "/sub"))
    EXPECT_TRUE(e.path().filename() == "control.sock" || e.path().filename() == "control.sock.lock") << e.path();
  const int fd = connect_to(path);
  ASSERT_GE(fd, 0);
  send_all(fd, "{\"cmd\":\"list\"}\n");
  EXPECT_EQ(Json::parse(read_line(fd))["ok"], true);
  ::close(fd);
}

// A symlink at the socket's path is refused and its target left as it was.
TEST_F(SocketFixture, SymlinkAtThePathIsRefusedAndItsTargetUntouched) {
  std::filesystem::create_directories(dir + "/sub");
  const std::string victim = dir + "/victim";
  std::filesystem::create_directories(dir + "/sub");
  { std::ofstream(victim) << "x"; }
  ::chmod(victim.c_str(), 0644);
  ASSERT_EQ(::symlink(victim.c_str(), path.c_str()), 0);
  EXPECT_THROW(server->listen(path, 0666), std::runtime_error);
  struct stat st {};
  ASSERT_EQ(::stat(victim.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  for (const auto& e : std::filesystem::directory_iterator(dir + "/sub"))
    EXPECT_EQ(e.path().filename(), "control.sock") << "the private directory is removed after a failure";
}

TEST_F(SocketFixture, GroupSetsTheSocketsGroup) {
  // Root may give the socket any group; anyone may give it their own.
  const gid_t group = ::geteuid() == 0 ? 65534 : ::getegid();
  server->listen(path, 0660, group);
  start();
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_gid, group);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
}

}  // namespace
}  // namespace blockway::gateway
