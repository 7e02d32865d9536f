// Server: listening sockets, the --stdio connection, and an orderly shutdown.
//
// Thread model: acceptors run on event loop 0; each accepted connection is
// handed to the next loop round-robin and lives there (handshake, then
// Session). The connection list is guarded by a mutex and touched only when a
// connection starts or ends and at shutdown. shutdown() may be called from any
// thread; on_drained runs once, on some loop thread, after the last connection
// has ended following shutdown().
#pragma once

#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "core/listen_address.hpp"
#include "nbd/session.hpp"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace blockway::nbd {

struct ServerOptions {
  SessionLimits limits;
  std::chrono::milliseconds handshake_timeout{10000};
  std::chrono::milliseconds shutdown_timeout{30000};
  // STARTTLS (--tls): the credentials, and whether TLS is off, offered or
  // required. Unix sockets and --stdio offer it as TCP does.
  std::shared_ptr<const TlsContext> tls;
  TlsMode tls_mode = TlsMode::off;
  core::UnixSocketAccess unix_access;  // --socket-mode/-user/-group
};

class Server {
 public:
  Server(core::EventLoops& loops, core::ExportTable& exports, ServerOptions options);
  ~Server();

  // Binds and starts accepting. Throws std::runtime_error naming the address.
  // Returns the addresses actually bound (port 0 resolved).
  std::vector<std::string> listen(const core::ListenAddress& address);
  // Accepts on a listening socket made by someone else (systemd socket
  // activation), TCP or Unix; the server owns the fd from then on. Returns
  // its address. Throws std::runtime_error (and closes nothing) if `fd` is
  // not a listening stream socket of those families.
  std::string adopt(int fd, const std::string& name = "");
  // Serves one client on stdin/stdout; the server drains when it leaves.
  void serve_stdio();
  // Serves a kernel NBD device's connection (the daemon's end of a
  // socketpair): no handshake, the session starts in transmission with
  // `negotiated` (the kernel got the flags and size by netlink). `ended`
  // runs on the connection's loop when it is over, for whatever reason.
  void serve_attached(int fd, Negotiated negotiated, std::string peer, std::function<void()> ended);
  // Stops accepting and ends every connection gracefully; after the timeout,
  // forcibly. Idempotent.
  void shutdown();
  void set_on_drained(std::function<void()> fn) { on_drained_ = std::move(fn); }
  [[nodiscard]] size_t connection_count() const;

 private:
  struct Connection;
  // `name`: the listener's name (listen= on exports), may be empty.
  core::Task<void> accept_tcp(std::shared_ptr<boost::asio::ip::tcp::acceptor> acceptor, std::string name);
  core::Task<void> accept_unix(std::shared_ptr<boost::asio::local::stream_protocol::acceptor> acceptor,
                                  std::string path, std::string name);
  void start_connection(boost::asio::io_context& ctx, int fd_in, int fd_out, PeerInfo peer,
                        std::optional<Negotiated> preset = std::nullopt, std::function<void()> ended = {});
  core::Task<void> serve(std::shared_ptr<Connection> conn);
  void connection_ended(Connection* conn);
  void force_close_all();

  core::EventLoops& loops_;
  core::ExportTable& exports_;
  ServerOptions options_;
  HandshakeOptions handshake_options_;
  std::shared_ptr<spdlog::logger> log_;

  mutable std::mutex mutex_;
  std::list<std::weak_ptr<Connection>> connections_;
  std::vector<std::shared_ptr<boost::asio::ip::tcp::acceptor>> tcp_acceptors_;
  std::vector<std::shared_ptr<boost::asio::local::stream_protocol::acceptor>> unix_acceptors_;
  struct SocketFile {
    std::string path;
    dev_t dev;
    ino_t ino;
  };
  std::vector<SocketFile> unix_paths_;
  std::atomic<bool> shutting_down_{false};
  bool drained_called_ = false;
  bool stdio_ = false;
  std::function<void()> on_drained_;
  std::unique_ptr<boost::asio::steady_timer> shutdown_timer_;
};

}  // namespace blockway::nbd
