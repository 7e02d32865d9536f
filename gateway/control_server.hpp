// ControlServer: the daemon's control socket. A Unix stream socket (mode 0600
// by default: root-only when the daemon runs as root; 0660 with a group for
// operators in it), created with its mode already set: it is bound in a
// private directory and renamed into place. On it every client
// sends newline-delimited JSON requests and reads one response line each
// (see control_protocol.hpp).
//
// Thread model: the acceptor and every client coroutine run on one event loop
// (the daemon's loop 0); requests of one client are answered in order, those
// of different clients concurrently (a slow detach does not hold up status).
// stop() may be called from any thread: it posts to that loop. The destructor
// runs after the loops stopped and removes the socket file only if it is still
// the one this server created.
//
// One daemon per socket: listen() first takes an flock on PATH.lock, held
// until the destructor (a second daemon fails with "another blockwayd is
// running on PATH (pid N)"); under it, it removes the private directory a
// daemon killed inside listen() left behind (the lock file names it).
#pragma once

#include "gateway/client_acceptor.hpp"
#include "gateway/control_protocol.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>

#include <sys/types.h>

#include <memory>
#include <string>

namespace blockway::gateway {

class ControlServer {
 public:
  ControlServer(boost::asio::io_context& ctx, const ControlDispatcher& dispatcher);
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Creates the socket's directory if needed, binds in a private directory
  // next to `path`, sets `mode` (and `group` unless -1) there and renames the
  // socket into place, replacing a stale socket file (never a live one:
  // std::runtime_error); then starts accepting. Throws std::runtime_error
  // naming the path, or the pid of the daemon that holds PATH.lock.
  void listen(const std::string& path, mode_t mode = 0600, gid_t group = static_cast<gid_t>(-1));
  // Stops accepting and closes every client connection.
  void stop();
  [[nodiscard]] const std::string& path() const noexcept { return path_; }

  // True if something accepts connections on `path` right now.
  static bool is_live(const std::string& path);

 private:
  using Socket = boost::asio::local::stream_protocol::socket;
  core::Task<void> serve(std::shared_ptr<Socket> socket);

  boost::asio::io_context& ctx_;
  const ControlDispatcher& dispatcher_;
  ClientAcceptor<boost::asio::local::stream_protocol> acceptor_;
  std::string path_;
  std::string lock_path_;  // PATH.lock, flocked while this server owns PATH
  int lock_fd_ = -1;
  dev_t dev_ = 0;
  ino_t ino_ = 0;
};

}  // namespace blockway::gateway
