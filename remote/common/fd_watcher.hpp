// FdWatcher: drives a C library with an "fd + wanted events + service" async
// API (libnbd today; libiscsi and libnfs have the same shape) from an Asio
// io_context.
//
// The library owns its socket. The watcher wraps the fd in a
// posix::stream_descriptor without owning it (release() before the wrapper is
// destroyed or the fd changes, never close()) and keeps at most one
// wait_read and one wait_write pending, as the library's wanted events ask.
// When the fd is ready it calls the library's service function and asks again
// what the library wants. Asio's waits are edge-triggered but the libraries
// expect poll()'s level semantics (libnbd reads one reply per notification),
// so before queueing a wait the watcher checks the level with a zero-timeout
// poll() and services at once when the fd is already ready (a wanted write is
// tried once without the poll: sends that find no room are harmless). After queueing new commands the owner calls kick() (or kick_soon(), once per loop turn),
// so a library that now has bytes to send gets its POLLOUT armed. If the
// library's fd changed (a reconnect made a new socket), the next arm() wraps
// the new one.
//
// A client that wants nothing (wanted() == 0, e.g. no command in flight)
// leaves no operation pending, so an idle session does not keep
// io_context::run() from returning at shutdown; its next command kicks the
// watcher again. A lost peer is then noticed when the next command is sent.
//
// Completion handlers rather than one coroutine: the read and write waits are
// independent and either may be pending alone, which two small handlers
// express directly. Deviation from the first sketch, on purpose.
//
// Thread model: every method and every call into the Client runs on the one
// io_context the watcher was created with (the owning connection's event
// loop); nothing here is thread-safe by itself. Pending handlers hold a
// shared_ptr to the watcher and only a weak_ptr to the client, so either may
// go away while a wait is outstanding; stop() makes later handlers no-ops.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include <memory>
#include <poll.h>

namespace blockway::remote::common {

class FdWatcher : public std::enable_shared_from_this<FdWatcher> {
 public:
  // What the watcher needs from the library, called on the watcher's loop.
  class Client {
   public:
    virtual ~Client() = default;
    // The library's current fd, or -1 while it has none.
    [[nodiscard]] virtual int watched_fd() = 0;
    // POLLIN and/or POLLOUT, or 0 for "nothing to wait for now".
    [[nodiscard]] virtual short wanted_events() = 0;
    // The fd is ready for `revents` (POLLIN or POLLOUT, or POLLERR when the
    // wait itself failed): let the library make progress. POLLIN is passed
    // only when poll() reported the fd readable; POLLOUT also when the
    // library asked for it and the fd may be full (see arm()): the library
    // must then take EAGAIN from its send in its stride.
    virtual void service(short revents) = 0;
  };

  static std::shared_ptr<FdWatcher> create(const boost::asio::any_io_executor& ex,
                                           std::weak_ptr<Client> client);
  ~FdWatcher();
  FdWatcher(const FdWatcher&) = delete;
  FdWatcher& operator=(const FdWatcher&) = delete;

  // Re-reads the fd and the wanted events and arms the waits that are missing.
  void kick() { arm(); }
  // Like kick(), but once, after the handlers already queued on the loop ran:
  // commands queued in the same turn (a client's pipelined requests) leave
  // in one service call instead of one each. libnfs 4.0's rpc_service scans
  // its 1024 reply buckets for timeouts on every call, so this is ~6% of the
  // daemon's cycles at 4 KiB, QD16. Costs one post per batch (same thread).
  void kick_soon();
  // Cancels the waits and forgets the fd (without closing it). Call before the
  // library closes its fd. The watcher stays usable: kick() starts again.
  void stop();
  // Drops the client for good: no handler will call it again.
  void detach();

  [[nodiscard]] int fd() const noexcept { return fd_; }

 private:
  struct Private {};

 public:
  FdWatcher(Private, const boost::asio::any_io_executor& ex, std::weak_ptr<Client> client);

 private:
  void arm();
  void on_ready(bool write, const boost::system::error_code& ec);

  boost::asio::posix::stream_descriptor sd_;
  std::weak_ptr<Client> client_;
  int fd_ = -1;
  bool read_pending_ = false;
  bool write_pending_ = false;
  unsigned epoch_ = 0;       // bumped by stop(): handlers of older waits are stale
  bool kick_posted_ = false;  // a kick_soon() is queued and has not run yet
};

}  // namespace blockway::remote::common
