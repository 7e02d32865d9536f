#include "gateway/control_server.hpp"

#include "core/logging.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <thread>

namespace blockway::gateway {

using core::logger;
using core::Task;

namespace asio = boost::asio;
using stream = asio::local::stream_protocol;

ControlServer::ControlServer(asio::io_context& ctx, const ControlDispatcher& dispatcher)
    : ctx_(ctx), dispatcher_(dispatcher), acceptor_(ctx, "control", "control socket") {}

ControlServer::~ControlServer() {
  if (!path_.empty()) {
    struct stat st {};
    if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) ::unlink(path_.c_str());
  }
  // Unlinked while still held: a daemon waiting on this file finds it gone
  // once it gets the lock, and takes the new one (see ControlLock::acquire).
  if (lock_fd_ >= 0) {
    ::unlink(lock_path_.c_str());
    ::close(lock_fd_);
  }
}

bool ControlServer::is_live(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  asio::io_context probe_ctx;
  stream::socket probe(probe_ctx);
  boost::system::error_code ec;
  probe.connect(stream::endpoint(path), ec);
  return !ec;
}

namespace {

// The socket's lock file (PATH.lock), flocked for the daemon's life: whoever
// holds it owns PATH, so two daemons started at once cannot both find a stale
// socket and replace it (the second would take the first's). It holds the
// owner's pid, and while listen() runs the private directory it works in, so
// that a daemon killed in there leaves nothing the next owner cannot remove.
struct ControlLock {
  std::string path;
  int fd = -1;
  ~ControlLock() {
    if (fd >= 0) {
      ::unlink(path.c_str());
      ::close(fd);
    }
  }

  // Takes the lock or throws, naming the daemon that holds it.
  void acquire(const std::string& socket_path) {
    path = socket_path + ".lock";
    for (int attempt = 0;; ++attempt) {
      fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
      if (fd < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
      // The daemon truncates and writes this file: in a directory others can
      // write to, a hard link or a file of another user planted there must
      // not make it write elsewhere or let that user hold the lock.
      struct stat st {};
      if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid() || st.st_nlink != 1) {
        ::close(fd);
        fd = -1;
        throw std::runtime_error("refusing the lock file " + path +
                                 ": not a regular file of this user with a single link (remove it if it is stale)");
      }
      if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        const int e = errno;
        std::string holder = e == EWOULDBLOCK ? owner() : "";
        ::close(fd);
        fd = -1;
        if (e != EWOULDBLOCK) throw std::runtime_error("cannot lock " + path + ": " + std::strerror(e));
        throw std::runtime_error("another blockwayd is running on " + socket_path + " (pid " + holder + ")");
      }
      // The holder we waited for unlinks the file before it lets go: a lock
      // on an unlinked file proves nothing, take the one at the path now.
      struct stat held {}, now {};
      if (::fstat(fd, &held) == 0 && ::stat(path.c_str(), &now) == 0 && held.st_dev == now.st_dev &&
          held.st_ino == now.st_ino)
        return;
      ::close(fd);
      fd = -1;
      if (attempt >= 100) throw std::runtime_error("cannot lock " + path + ": it keeps being replaced");
    }
  }

  // The pid in a held lock file ("unknown" if it has not written it yet).
  std::string owner() const {
    for (int i = 0; i < 50; ++i) {
      const auto [pid, dir] = read();
      if (!pid.empty()) return pid;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // just locked: writing it
    }
    return "unknown";
  }

  // Line 1: the pid; line 2 (while listen() runs): the private directory.
  std::pair<std::string, std::string> read() const {
    char buf[4096];
    const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    const std::string text(buf, n > 0 ? static_cast<size_t>(n) : 0);
    const size_t nl = text.find('\n');
    if (nl == std::string::npos) return {};
    const size_t nl2 = text.find('\n', nl + 1);
    return {text.substr(0, nl), nl2 == std::string::npos ? std::string() : text.substr(nl + 1, nl2 - nl - 1)};
  }

  void write(const std::string& private_dir) {
    const std::string text =
        std::to_string(::getpid()) + "\n" + (private_dir.empty() ? "" : private_dir + "\n");
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, text.data(), text.size(), 0) != static_cast<ssize_t>(text.size()))
      throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
  }
};

// Removes the private directory a daemon killed inside listen() left next to
// the socket (named in the lock file it held): only a directory of ours by
// its name, empty or with nothing but its socket in it.
void remove_stale_private_dir(const std::string& recorded, const std::filesystem::path& dir) {
  const auto p = std::filesystem::path(recorded);
  const std::string name = p.filename().string();
  if (p.parent_path() != dir || name.size() != std::string(".control-XXXXXX").size() ||
      name.rfind(".control-", 0) != 0)
    return;
  auto log = logger("control");
  const int fd = ::open(recorded.c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return;  // gone already (the usual case: its owner removed it)
  struct stat st {}, sock {};
  if (::fstat(fd, &st) == 0 && st.st_uid == ::geteuid()) {
    if (::fstatat(fd, "s", &sock, AT_SYMLINK_NOFOLLOW) == 0 && S_ISSOCK(sock.st_mode)) ::unlinkat(fd, "s", 0);
    if (::rmdir(recorded.c_str()) == 0)
      log->info("control socket: removed {}, left by a daemon that stopped while it started", recorded);
    else
      log->warn("control socket: {} was left by a daemon that stopped while it started, and is not empty: "
                "left as it is ({})", recorded, std::strerror(errno));
  }
  ::close(fd);
}

// A private directory next to the socket, removed (with what is left in it)
// when it goes out of scope.
struct PrivateDir {
  std::string path;
  int fd = -1;
  ~PrivateDir() {
    if (fd >= 0) {
      ::unlinkat(fd, "s", 0);
      ::close(fd);
    }
    if (!path.empty()) ::rmdir(path.c_str());
  }
};

}  // namespace

void ControlServer::listen(const std::string& path, mode_t mode, gid_t group) {
  const std::string where = "control socket " + path;
  if (path.empty() || path.front() != '/') throw std::runtime_error(where + ": needs an absolute path");
  if (path.size() >= 108) throw std::runtime_error(where + ": path is too long for a Unix socket");
  std::error_code fs_ec;
  const auto dir = std::filesystem::path(path).parent_path();
  if (!std::filesystem::exists(dir, fs_ec)) {
    std::filesystem::create_directories(dir, fs_ec);
    if (fs_ec) throw std::runtime_error(where + ": cannot create " + dir.string() + ": " + fs_ec.message());
  }
  auto refuse_existing = [&] {
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) return;
    if (!S_ISSOCK(st.st_mode)) throw std::runtime_error(where + ": the path exists and is not a socket");
    // Left behind by a crash, or in use by a running daemon: only a stale one
    // may be replaced.
    if (is_live(path)) throw std::runtime_error(where + ": another daemon is listening there");
  };
  ControlLock lock;
  lock.acquire(path);
  // Ours now: a socket still at `path` is stale (or not a blockwayd's).
  if (const auto [pid, left] = lock.read(); !left.empty()) remove_stale_private_dir(left, dir);
  lock.write({});
  refuse_existing();

  // The socket is bound in a fresh 0700 directory next to its path (nobody
  // else can reach it or swap anything in there), given its mode and group
  // there, and then renamed into place: it appears at `path` complete, and
  // nothing is ever done through `path` that a symlink swapped into the
  // directory could redirect. No umask change: other threads create files
  // concurrently (SQLite, the loops).
  PrivateDir tmp;
  {
    std::string tmpl = dir.string() + "/.control-XXXXXX";
    if (tmpl.size() + 2 >= 108)
      throw std::runtime_error(where + ": the directory's path is too long for a Unix socket");
    if (!::mkdtemp(tmpl.data()))
      throw std::runtime_error(where + ": cannot create a private directory in " + dir.string() + ": " +
                               std::strerror(errno));
    tmp.path = tmpl;
    lock.write(tmp.path);  // so that a kill -9 from here on leaves nothing behind
    tmp.fd = ::open(tmp.path.c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (tmp.fd < 0) throw std::runtime_error(where + ": cannot open " + tmp.path + ": " + std::strerror(errno));
  }
  const std::string private_path = tmp.path + "/s";
  auto acceptor = std::make_unique<stream::acceptor>(ctx_);
  boost::system::error_code ec;
  acceptor->open(stream(), ec);
  if (!ec) acceptor->bind(stream::endpoint(private_path), ec);
  auto sys_error = [&ec] { ec.assign(errno, boost::system::system_category()); };
  if (!ec && group != static_cast<gid_t>(-1) && ::fchownat(tmp.fd, "s", static_cast<uid_t>(-1), group,
                                                           AT_SYMLINK_NOFOLLOW) != 0)
    sys_error();
  // After the chown, which may clear set-id bits; fchmodat cannot refuse to
  // follow a symlink, but "s" in a directory only we can write is our socket.
  if (!ec && ::fchmodat(tmp.fd, "s", mode, 0) != 0) sys_error();
  if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
  struct stat mine {};
  if (!ec && ::fstatat(tmp.fd, "s", &mine, AT_SYMLINK_NOFOLLOW) != 0) sys_error();
  if (ec) throw std::runtime_error(where + ": " + ec.message());
  // Publish: never over anything (a daemon that started meanwhile); over a
  // stale socket only after checking again that it is stale.
  if (::renameat2(tmp.fd, "s", AT_FDCWD, path.c_str(), RENAME_NOREPLACE) != 0) {
    if (errno != EEXIST) throw std::runtime_error(where + ": " + std::strerror(errno));
    refuse_existing();
    if (::renameat(tmp.fd, "s", AT_FDCWD, path.c_str()) != 0)
      throw std::runtime_error(where + ": " + std::strerror(errno));
  }
  lock.write({});
  path_ = path;
  dev_ = mine.st_dev;
  ino_ = mine.st_ino;
  lock_path_ = std::exchange(lock.path, {});
  lock_fd_ = std::exchange(lock.fd, -1);
  acceptor_.start(std::move(acceptor), [this](std::shared_ptr<Socket> socket) { return serve(std::move(socket)); });
}

void ControlServer::stop() { acceptor_.stop(); }

Task<void> ControlServer::serve(std::shared_ptr<Socket> socket) {
  std::string buffer;
  while (true) {
    auto dyn = asio::dynamic_buffer(buffer, kMaxControlRequest + 1);
    auto [ec, n] = co_await asio::async_read_until(*socket, dyn, '\n', asio::as_tuple(asio::use_awaitable));
    std::string line;
    bool last = false;
    if (ec == asio::error::not_found) {
      // No newline within the limit: answer once and hang up, since the rest
      // of the line cannot be told apart from the next request.
      std::string reply = ControlDispatcher::error_line(
          "too-large", E2BIG, "request line is longer than " + std::to_string(kMaxControlRequest) + " bytes");
      reply += '\n';
      auto [wec, wn] = co_await asio::async_write(*socket, asio::buffer(reply), asio::as_tuple(asio::use_awaitable));
      (void)wec;
      (void)wn;
      break;
    } else if (ec == asio::error::eof && !buffer.empty()) {
      line = std::move(buffer);  // a last request without its newline
      buffer.clear();
      last = true;
    } else if (ec) {
      break;
    } else {
      line = buffer.substr(0, n - 1);
      buffer.erase(0, n);
    }
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) {
      if (last) break;
      continue;
    }
    std::string reply = co_await dispatcher_.handle(line);
    reply += '\n';
    auto [wec, wn] = co_await asio::async_write(*socket, asio::buffer(reply), asio::as_tuple(asio::use_awaitable));
    (void)wn;
    if (wec || last) break;
  }
  boost::system::error_code ignored;
  socket->close(ignored);
}

}  // namespace blockway::gateway
