#include "nbd/server.hpp"

#include "core/logging.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/steady_timer.hpp>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace blockway::nbd {

namespace asio = boost::asio;
using core::Task;

// How long SIGTERM lets a kernel device's connection serve on while waiting
// for a moment when the kernel has no request with it (Session::
// stop_when_quiet): about the kernel's shortest sensible request timeout, so
// the fallback costs no more than a request lost in the socket would.
constexpr std::chrono::milliseconds kQuietStopLimit{1000};

struct Server::Connection {
  Connection(Channel ch, PeerInfo p) : channel(std::move(ch)), peer(std::move(p)) {}
  Channel channel;
  PeerInfo peer;
  std::shared_ptr<Session> session;  // set once the handshake succeeded
  std::optional<Negotiated> preset;  // a kernel device's: no handshake
  bool attached = false;             // a kernel device's connection (preset)
  std::function<void()> ended;
};

Server::Server(core::EventLoops& loops, core::ExportTable& exports, ServerOptions options)
    : loops_(loops), exports_(exports), options_(options), log_(core::logger("nbd")) {
  handshake_options_.max_request_bytes = options_.limits.max_request_bytes;
  handshake_options_.shutting_down = &shutting_down_;
  handshake_options_.tls = options_.tls.get();
  handshake_options_.tls_mode = options_.tls ? options_.tls_mode : TlsMode::off;
}

Server::~Server() {
  // Remove only the socket files this server created: after a takeover the
  // path may belong to someone else.
  for (const auto& p : unix_paths_) {
    struct stat st {};
    if (::lstat(p.path.c_str(), &st) == 0 && st.st_dev == p.dev && st.st_ino == p.ino) ::unlink(p.path.c_str());
  }
}

namespace {
// Owner and mode of a freshly bound socket file, through an O_PATH handle
// of the file itself: a symlink swapped in at `path` is refused, never
// followed. (fchmod() on the socket's own fd would change the socket, not
// the file that connect() checks.)
void set_socket_access(const std::string& path, const core::UnixSocketAccess& access, const std::string& where) {
  if (!access.mode && !access.uid && !access.gid) return;
  const int fd = ::open(path.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
  struct stat st {};
  if (fd < 0 || ::fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) {
    const int err = fd < 0 ? errno : ELOOP;
    if (fd >= 0) ::close(fd);
    ::unlink(path.c_str());
    throw std::runtime_error(where + ": the socket file changed under us: " + std::strerror(err));
  }
  const std::string proc = "/proc/self/fd/" + std::to_string(fd);
  std::string failed;
  if ((access.uid || access.gid) &&
      ::fchownat(fd, "", access.uid.value_or(static_cast<uid_t>(-1)), access.gid.value_or(static_cast<gid_t>(-1)),
                 AT_EMPTY_PATH) != 0)
    failed = "socket-user/socket-group: " + std::string(std::strerror(errno)) +
             (errno == EPERM ? " (changing the owner needs root or CAP_CHOWN; a group needs membership)" : "");
  else if (access.mode && ::chmod(proc.c_str(), *access.mode) != 0)
    failed = "socket-mode: " + std::string(std::strerror(errno));
  ::close(fd);
  if (!failed.empty()) {
    ::unlink(path.c_str());
    throw std::runtime_error(where + ": " + failed);
  }
}
}  // namespace

std::vector<std::string> Server::listen(const core::ListenAddress& address) {
  auto& ctx = loops_.at(0);
  std::vector<std::string> bound;
  if (address.kind == core::ListenAddress::Kind::unix_socket) {
    struct stat st {};
    if (::lstat(address.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
      // A socket file is left behind by a crash, or belongs to a live server:
      // only a stale one may be replaced.
      asio::local::stream_protocol::socket probe(ctx);
      boost::system::error_code probe_ec;
      probe.connect(asio::local::stream_protocol::endpoint(address.path), probe_ec);
      if (!probe_ec)
        throw std::runtime_error("cannot listen on " + address.to_string() +
                                 ": another server is accepting connections there");
      ::unlink(address.path.c_str());
    }
    auto acceptor = std::make_shared<asio::local::stream_protocol::acceptor>(ctx);
    boost::system::error_code ec;
    acceptor->open(asio::local::stream_protocol(), ec);
    if (!ec) acceptor->bind(asio::local::stream_protocol::endpoint(address.path), ec);
    if (ec) throw std::runtime_error("cannot listen on " + address.to_string() + ": " + ec.message());
    set_socket_access(address.path, options_.unix_access, "cannot listen on " + address.to_string());
    acceptor->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) throw std::runtime_error("cannot listen on " + address.to_string() + ": " + ec.message());
    struct stat mine {};
    ::lstat(address.path.c_str(), &mine);
    unix_paths_.push_back({address.path, mine.st_dev, mine.st_ino});
    unix_acceptors_.push_back(acceptor);
    asio::co_spawn(ctx, accept_unix(acceptor, address.path, address.name), asio::detached);
    bound.push_back(address.to_string());
    return bound;
  }
  asio::ip::tcp::resolver resolver(ctx);
  boost::system::error_code ec;
  const std::string host = address.host.empty() ? "::" : address.host;
  auto results = resolver.resolve(host, std::to_string(address.port),
                                  asio::ip::tcp::resolver::passive | asio::ip::tcp::resolver::numeric_service, ec);
  if (ec) throw std::runtime_error("cannot resolve " + address.to_string() + ": " + ec.message());
  std::vector<asio::ip::tcp::endpoint> done;
  for (const auto& r : results) {
    auto ep = r.endpoint();
    if (std::find(done.begin(), done.end(), ep) != done.end()) continue;
    done.push_back(ep);
    auto acceptor = std::make_shared<asio::ip::tcp::acceptor>(ctx);
    acceptor->open(ep.protocol(), ec);
    if (!ec) acceptor->set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec && ep.address().is_v6()) acceptor->set_option(asio::ip::v6_only(!address.host.empty()), ec);
    if (!ec) acceptor->bind(ep, ec);
    if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
    if (ec)
      throw std::runtime_error("cannot listen on " + address.to_string() + " (" + ep.address().to_string() +
                               "): " + ec.message() + core::privileged_port_hint(address.port, ec.value()));
    const auto local = acceptor->local_endpoint();
    bound.push_back((local.address().is_v6() ? "[" + local.address().to_string() + "]"
                                             : local.address().to_string()) +
                    ":" + std::to_string(local.port()));
    tcp_acceptors_.push_back(acceptor);
    asio::co_spawn(ctx, accept_tcp(acceptor, address.name), asio::detached);
  }
  return bound;
}

std::string Server::adopt(int fd, const std::string& name) {
  auto& ctx = loops_.at(0);
  int type = 0, listening = 0;
  socklen_t len = sizeof type;
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0)
    throw std::runtime_error("passed fd " + std::to_string(fd) + " is not a socket");
  len = sizeof listening;
  if (type != SOCK_STREAM || ::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening)
    throw std::runtime_error("passed fd " + std::to_string(fd) + " is not a listening stream socket");
  sockaddr_storage addr{};
  len = sizeof addr;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    throw std::runtime_error("passed fd " + std::to_string(fd) + ": getsockname failed");
  boost::system::error_code ec;
  if (addr.ss_family == AF_UNIX) {
    auto acceptor = std::make_shared<asio::local::stream_protocol::acceptor>(ctx);
    acceptor->assign(asio::local::stream_protocol(), fd, ec);
    if (ec) throw std::runtime_error("passed fd " + std::to_string(fd) + ": " + ec.message());
    const std::string path = acceptor->local_endpoint(ec).path();
    // The socket file is its creator's to remove: not in unix_paths_.
    unix_acceptors_.push_back(acceptor);
    asio::co_spawn(ctx, accept_unix(acceptor, path, name), asio::detached);
    return "unix:" + path;
  }
  if (addr.ss_family != AF_INET && addr.ss_family != AF_INET6)
    throw std::runtime_error("passed fd " + std::to_string(fd) + " is neither a TCP nor a Unix socket");
  auto acceptor = std::make_shared<asio::ip::tcp::acceptor>(ctx);
  acceptor->assign(addr.ss_family == AF_INET ? asio::ip::tcp::v4() : asio::ip::tcp::v6(), fd, ec);
  if (ec) throw std::runtime_error("passed fd " + std::to_string(fd) + ": " + ec.message());
  const auto local = acceptor->local_endpoint(ec);
  tcp_acceptors_.push_back(acceptor);
  asio::co_spawn(ctx, accept_tcp(acceptor, name), asio::detached);
  return (local.address().is_v6() ? "[" + local.address().to_string() + "]" : local.address().to_string()) + ":" +
         std::to_string(local.port());
}

Task<void> Server::accept_tcp(std::shared_ptr<asio::ip::tcp::acceptor> acceptor, std::string name) {
  while (!shutting_down_) {
    auto& target = loops_.next();
    auto [ec, socket] = co_await acceptor->async_accept(target, asio::as_tuple(asio::use_awaitable));
    if (ec) {
      if (ec == asio::error::operation_aborted || shutting_down_) co_return;
      log_->warn("accept failed: {}", ec.message());
      if (ec == asio::error::no_descriptors || ec == asio::error::no_buffer_space) {
        asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(100));
        co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
      }
      continue;
    }
    boost::system::error_code ignored;
    socket.set_option(asio::ip::tcp::no_delay(true), ignored);
    PeerInfo peer;
    const auto remote = socket.remote_endpoint(ignored);
    auto addr = remote.address();
    if (addr.is_v6() && addr.to_v6().is_v4_mapped()) addr = asio::ip::make_address_v4(asio::ip::v4_mapped, addr.to_v6());  // dual-stack
    peer.address = addr.to_string();
    peer.text = (addr.is_v6() ? "[" + peer.address + "]" : peer.address) + ":" + std::to_string(remote.port());
    peer.listener = name;
    const int fd = socket.release(ignored);
    if (fd >= 0) start_connection(target, fd, -1, std::move(peer));
  }
}

namespace {
// The uid and gid the kernel recorded for a Unix socket's client.
PeerInfo unix_peer(int fd, const std::string& path) {
  PeerInfo peer;
  peer.unix_socket = true;
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
    peer.uid = cred.uid;
    peer.gid = cred.gid;
    peer.text = "unix:" + path + " (pid " + std::to_string(cred.pid) + " uid " + std::to_string(cred.uid) + ")";
    // Its supplementary groups as the kernel holds them (group: rules).
    std::vector<gid_t> groups(64);
    for (;;) {
      socklen_t glen = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
      if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &glen) == 0) {
        groups.resize(glen / sizeof(gid_t));
        peer.groups = std::move(groups);
        break;
      }
      if (errno != ERANGE || glen / sizeof(gid_t) <= groups.size()) break;
      groups.resize(glen / sizeof(gid_t));
    }
  } else {
    peer.text = "unix:" + path;
  }
  return peer;
}
}  // namespace

Task<void> Server::accept_unix(std::shared_ptr<asio::local::stream_protocol::acceptor> acceptor, std::string path,
                               std::string name) {
  while (!shutting_down_) {
    auto& target = loops_.next();
    auto [ec, socket] = co_await acceptor->async_accept(target, asio::as_tuple(asio::use_awaitable));
    if (ec) {
      if (ec == asio::error::operation_aborted || shutting_down_) co_return;
      log_->warn("accept failed: {}", ec.message());
      continue;
    }
    boost::system::error_code ignored;
    const int fd = socket.release(ignored);
    if (fd >= 0) {
      PeerInfo peer = unix_peer(fd, path);
      peer.listener = name;
      start_connection(target, fd, -1, std::move(peer));
    }
  }
}

void Server::serve_stdio() {
  stdio_ = true;
  // Duplicates, so that closing the channel leaves fds 0 and 1 valid.
  const int in = ::dup(STDIN_FILENO);
  const int out = ::dup(STDOUT_FILENO);
  if (in < 0 || out < 0) throw std::runtime_error("cannot duplicate stdin/stdout");
  start_connection(loops_.at(0), in, out, PeerInfo{.text = "stdio"});
}

void Server::serve_attached(int fd, Negotiated negotiated, std::string peer, std::function<void()> ended) {
  start_connection(loops_.next(), fd, -1, PeerInfo{.text = std::move(peer)}, std::move(negotiated),
                   std::move(ended));
}

void Server::start_connection(asio::io_context& ctx, int fd_in, int fd_out, PeerInfo peer,
                              std::optional<Negotiated> preset, std::function<void()> ended) {
  std::shared_ptr<Connection> conn;
  try {
    Channel ch = fd_out < 0 ? Channel(Channel::Descriptor(ctx, fd_in))
                            : Channel(Channel::Descriptor(ctx, fd_in), Channel::Descriptor(ctx, fd_out));
    conn = std::make_shared<Connection>(std::move(ch), std::move(peer));
    conn->attached = preset.has_value();
    conn->preset = std::move(preset);
    conn->ended = std::move(ended);
  } catch (const std::exception& e) {
    log_->error("cannot set up connection: {}", e.what());
    ::close(fd_in);
    if (fd_out >= 0) ::close(fd_out);
    if (ended) ended();
    return;
  }
  {
    std::lock_guard lock(mutex_);
    connections_.push_back(conn);
  }
  asio::co_spawn(ctx, serve(conn), [this, conn](std::exception_ptr e) {
    if (e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& ex) {
        log_->error("connection ended with an error: {}", ex.what());
      }
    }
    auto ended = std::move(conn->ended);
    connection_ended(conn.get());
    if (ended) ended();
  });
}

Task<void> Server::serve(std::shared_ptr<Connection> conn) {
  auto& ch = conn->channel;
  if (conn->preset) {
    if (!shutting_down_) {
      conn->session = std::make_shared<Session>(ch, std::move(*conn->preset), options_.limits);
      co_await conn->session->run();
    }
    ch.close();
    if (conn->session) co_await conn->session->flush_if_dirty();
    conn->session.reset();
    co_return;
  }
  // The handshake has a deadline: a silent or slow client is cut off.
  asio::steady_timer deadline(ch.executor(), options_.handshake_timeout);
  deadline.async_wait([conn](boost::system::error_code ec) {
    if (!ec) conn->channel.cancel();
  });
  auto negotiated = co_await negotiate(ch, exports_, handshake_options_, conn->peer);
  deadline.cancel();
  if (negotiated && !shutting_down_) {
    log_->debug("client {} entered transmission on export '{}'{}", conn->peer.text, negotiated->exp->name,
                negotiated->tls ? " over TLS" : "");
    conn->session = std::make_shared<Session>(ch, std::move(*negotiated), options_.limits);
    if (shutting_down_) conn->session->stop();
    co_await conn->session->run();
  }
  ch.close();
  if (conn->session) co_await conn->session->flush_if_dirty();
  conn->session.reset();
}

void Server::connection_ended(Connection* conn) {
  std::function<void()> drained;
  {
    std::lock_guard lock(mutex_);
    connections_.remove_if([&](const std::weak_ptr<Connection>& w) {
      auto p = w.lock();
      return !p || p.get() == conn;
    });
    if (stdio_ && !shutting_down_) {
      // The one stdio client is gone: the daemon's work is done.
      shutting_down_ = true;
    }
    if (shutting_down_ && connections_.empty() && !drained_called_) {
      drained_called_ = true;
      drained = on_drained_;
    }
  }
  if (stdio_) {
    for (auto& a : tcp_acceptors_) asio::post(a->get_executor(), [a] { boost::system::error_code ig; a->close(ig); });
    for (auto& a : unix_acceptors_) asio::post(a->get_executor(), [a] { boost::system::error_code ig; a->close(ig); });
  }
  if (drained) {
    asio::post(loops_.at(0), [this] {
      if (shutdown_timer_) shutdown_timer_->cancel();
    });
    drained();
  }
}

// Runs on loop 0 (the daemon's signal handler), like the shutdown timer.
void Server::shutdown() {
  if (shutting_down_.exchange(true)) {
    // A second request: do not wait any longer.
    force_close_all();
    return;
  }
  for (auto& a : tcp_acceptors_)
    asio::post(a->get_executor(), [a] {
      boost::system::error_code ig;
      a->close(ig);
    });
  for (auto& a : unix_acceptors_)
    asio::post(a->get_executor(), [a] {
      boost::system::error_code ig;
      a->close(ig);
    });
  std::vector<std::shared_ptr<Connection>> live;
  std::function<void()> drained;
  {
    std::lock_guard lock(mutex_);
    for (auto& w : connections_)
      if (auto c = w.lock()) live.push_back(c);
    if (live.empty() && !drained_called_) {
      drained_called_ = true;
      drained = on_drained_;
    }
  }
  for (auto& c : live) {
    asio::post(c->channel.executor(), [c] {
      if (c->session && c->attached)
        c->session->stop_when_quiet(kQuietStopLimit);  // a kernel device: see Session
      else if (c->session)
        c->session->stop();
      else
        c->channel.cancel();  // still in the handshake
    });
  }
  if (drained) {
    drained();
    return;
  }
  shutdown_timer_ = std::make_unique<asio::steady_timer>(loops_.at(0), options_.shutdown_timeout);
  shutdown_timer_->async_wait([this](boost::system::error_code ec) {
    if (!ec) {
      log_->warn("connections still open after the shutdown timeout, closing them");
      force_close_all();
    }
  });
}

void Server::force_close_all() {
  std::vector<std::shared_ptr<Connection>> live;
  {
    std::lock_guard lock(mutex_);
    for (auto& w : connections_)
      if (auto c = w.lock()) live.push_back(c);
  }
  for (auto& c : live) asio::post(c->channel.executor(), [c] { c->channel.close(); });
}

size_t Server::connection_count() const {
  std::lock_guard lock(mutex_);
  return connections_.size();
}

}  // namespace blockway::nbd
