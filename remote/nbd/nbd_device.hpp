// NbdDevice: an image on another NBD server, reached through libnbd.
//
// URIs are libnbd's: nbd://host[:port]/export and
// nbd+unix:///export?socket=/path. Every connection is made (and its
// handshake finished, with base:allocation requested) before the device is
// returned, so a wrong URI, a server that is not there or an unknown export
// stops the daemon at start-up.
//
// Data path: libnbd's asynchronous API, many requests in flight per
// connection. Each connection belongs to one event loop: its libnbd handle is
// only ever touched on that loop's thread, an FdWatcher
// (remote/common/fd_watcher.hpp) drives the handle from the same loop, and completion callbacks post the
// result to the awaiting coroutine's executor (never resuming it inside
// libnbd, whose lock is held during callbacks). A request issued on a loop
// that owns a connection uses it directly; from any other thread it hops to a
// connection's loop (round-robin) and back. With several connections and no
// multi-conn from the server, a flush is sent on every connection.
//
// Each connection is a session (remote/common/loop_session.hpp): the
// per-loop object that lives as long as the device, holding the libnbd
// handle that a reconnect replaces.
//
// Failures: a request that gets no reply within io-timeout kills its
// session (every request in flight on it fails with ETIMEDOUT); a lost
// connection fails its requests with ENOTCONN/ECONNRESET and later requests
// fast with ENOTCONN until reconnect(). reconnect() makes fresh connections on
// the blocking pool (each bounded by io-timeout) and then swaps them in on
// their loops; generation() counts the swaps.
//
// Callers' own connections (serve_callers(), the nbdkit plugin): a front end
// whose requests run on threads of its own, each blocked on one request at a
// time and running an io_context of its own meanwhile (nbdkit's workers,
// nbdkit/plugin_stack.hpp), can have each such thread use a connection of
// its own, opened on its first request and driven from its io_context, so a
// request never leaves the thread: the hop to a session's loop and back cost
// the plugin ~3 context switches per 4 KiB request (bench/results/plugin.md).
// Only when the server offers multi-conn (then a flush on one connection
// covers the writes completed on all of them, NBD spec) and connections= was
// not set; reads larger than 256 KiB still go to the loops' connections,
// where 1 MiB reads measured faster (on the callers' connections 0.53-0.80x
// of that in bench/plugin.sh, 0.90x in direct A/B runs; 1 MiB writes
// 1.11-1.18x faster there, so writes of any size stay), the hop being small
// beside the transfer. A caller's connection that is lost fails its requests
// fast with ENOTCONN, like a loop's; it is opened again on the caller's
// thread once a reconnect() (RetryLayer's) made a new generation. A caller
// whose connection cannot be opened (a server that limits its connections
// refuses it) sends its requests to the loops' connections, and tries again
// after a reconnect() or 10 s.
//
// Thread model: any method may be called from any event-loop thread. The
// session objects are fixed at construction; what changes (handle, in-flight
// list, timers) is confined to each session's loop. connected() and
// generation() are atomics. reconnect() is never called concurrently with
// itself (RetryLayer's contract). The device must be destroyed when its loops
// no longer run its connections (after EventLoops::run() returned).
#pragma once

#include "core/event_loops.hpp"
#include "core/remote_device.hpp"
#include "remote/common/loop_session.hpp"

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace blockway::remote::nbd {

struct NbdOptions {
  unsigned connections = 0;  // 0: one per event loop if the server allows multi-conn, else 1
  std::chrono::milliseconds io_timeout{30000};
};

class NbdDevice final : public core::RemoteDevice {
 public:
  // Connects synchronously. Throws BackendError (remote/backend.hpp) with a
  // message naming the URI and what libnbd said.
  NbdDevice(std::string uri, bool read_only, NbdOptions options, core::EventLoops& loops);
  ~NbdDevice() override;
  NbdDevice(const NbdDevice&) = delete;
  NbdDevice& operator=(const NbdDevice&) = delete;

  [[nodiscard]] core::Geometry geometry() const noexcept override { return geometry_; }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override { return caps_; }
  [[nodiscard]] std::string describe() const override { return "nbd:" + uri_; }

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> flush() override;
  core::Task<std::error_code> trim(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> zero(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> block_status(core::ByteRange range, core::ExtentList& out) override;
  core::Task<std::error_code> prefetch(core::ByteRange range) override;

  core::Task<std::error_code> reconnect() override;
  [[nodiscard]] bool connected() const noexcept override;
  [[nodiscard]] uint64_t generation() const noexcept override { return sessions_.generation(); }

  [[nodiscard]] size_t connection_count() const noexcept { return sessions_.size(); }

  // The calling thread's own io_context when it is one of a front end's
  // request threads running it, else nullptr (our loops, anything else).
  using CallerContext = std::function<boost::asio::io_context*()>;
  // From now on a request arriving on a thread for which `which` names an
  // io_context runs on that context's own connection (see the head of this
  // file). Returns false and changes nothing unless the server offers
  // multi-conn and no connections= count was set. Before any request.
  bool serve_callers(CallerContext which);

  class Session;
  struct Request;

 private:
  // The connection of the caller's io_context `io`: opened here (blocking,
  // bounded by io-timeout) on its first request, and again when lost and a
  // reconnect() has been made since (a lost one until then: fails fast);
  // nullptr (use the loops') for kCallerRetry after an open failed.
  Session* caller_session(boost::asio::io_context& io);
  // `data`: the bytes a read moves (0 for the other commands): over
  // kCallerMaxData, a caller's read goes to the loops' connections.
  template <class Issue>
  core::Task<std::error_code> submit(Issue issue, uint64_t data = 0);
  template <class Issue>
  core::Task<std::error_code> submit_on(Session& s, Issue issue);
  // Trim, zero and cache in commands of at most kMaxCommandLength.
  template <class Issue>
  core::Task<std::error_code> submit_in_steps(core::ByteRange range, Issue issue);

  std::string uri_;
  bool read_only_ = false;
  NbdOptions options_;
  core::EventLoops& loops_;
  core::Geometry geometry_;
  core::Capabilities caps_;
  bool fast_zero_ = false;
  common::SessionSet<Session> sessions_;
  // Callers' connections by io_context (serve_callers()). An entry is only
  // touched on the thread running its io_context; the map under the mutex
  // (its nodes stay put as it grows).
  struct Caller {
    std::shared_ptr<Session> session;
    uint64_t generation = 0;  // generation() when it was last (re)opened
    bool refused = false;  // the last open failed: the loops' connections until next_try
    std::chrono::steady_clock::time_point next_try;
  };
  std::atomic<bool> caller_refusal_warned_{false};  // one warning per device
  CallerContext caller_context_;
  std::mutex callers_mutex_;
  std::unordered_map<boost::asio::io_context*, Caller> callers_;
  std::atomic<uint64_t> caller_opened_{0};  // numbers them in messages
};

}  // namespace blockway::remote::nbd
