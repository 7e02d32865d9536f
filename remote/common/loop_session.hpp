// LoopSession and SessionSet: the per-loop session plumbing that every
// backend driven through a C library's "fd + events + service" API (libnbd,
// libiscsi, libnfs) shares.
//
// A device keeps a SessionSet: one LoopSession per event loop by default
// (or as many as its option says), round-robin over the loops. A session
// lives as long as the device; the library handle inside it (a libnbd
// handle, an iSCSI context, an NFS context with the image open) is made on a
// blocking thread (connect_all(), or reconnect on the blocking pool) and then
// installed on the session's loop, replacing the one that was lost.
//
// LoopSession holds what every session has: its loop, name and logger, the
// FdWatcher that drives the library from the loop, and the alive flag other
// threads read to fail fast. The backend's session class derives from it and
// adds the handle, the requests in flight (InflightRequests) and start(),
// which issues one command; nothing here is virtual on the request path.
//
// Thread model: a session's state is touched on its loop only, apart from
// alive() (an atomic) and the fixed loop/name. SessionSet is fixed after
// the device's constructor, apart from the round-robin cursor and the
// generation (atomics); install() hops to the session's loop.
#pragma once

#include "core/event_loops.hpp"
#include "core/logging.hpp"
#include "core/remote_device.hpp"
#include "core/task.hpp"
#include "remote/common/fd_watcher.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace blockway::remote::common {

class LoopSession : public FdWatcher::Client, public std::enable_shared_from_this<LoopSession> {
 public:
  LoopSession(boost::asio::io_context& io, std::string name, const std::string& log_module)
      : io_(io), name_(std::move(name)), log_(core::logger(log_module)) {}
  // The derived destructor has failed its requests and closed its handle.
  ~LoopSession() override {
    if (watcher_) watcher_->detach();
  }
  LoopSession(const LoopSession&) = delete;
  LoopSession& operator=(const LoopSession&) = delete;

  [[nodiscard]] boost::asio::io_context::executor_type executor() const noexcept { return io_.get_executor(); }
  [[nodiscard]] bool on_this_thread() const noexcept { return io_.get_executor().running_in_this_thread(); }
  [[nodiscard]] bool alive() const noexcept { return alive_.load(std::memory_order_acquire); }
  [[nodiscard]] const std::string& name() const noexcept { return name_; }

 protected:
  // A new handle is in place (on the loop, or before the loops run).
  void mark_up() {
    if (!watcher_) watcher_ = FdWatcher::create(io_.get_executor(), weak_from_this());
    alive_.store(true, std::memory_order_release);
  }

  // The handle is about to be closed: later requests fail fast. Logs the
  // loss unless nothing was lost (no request in flight, err ENOTCONN). The
  // caller then fails its requests, calls stop_watching() and closes the
  // handle.
  void mark_down(int err, const std::string& why, size_t in_flight, std::string_view what = "requests") {
    alive_.store(false, std::memory_order_release);
    if (in_flight > 0 || err != ENOTCONN)
      log_->warn("{}: session closed: {} ({} {} in flight fail with {})", name_, why, in_flight, what,
                 std::error_code(err, std::system_category()).message());
  }

  // Before the library closes its fd.
  void stop_watching() {
    if (watcher_) watcher_->stop();
  }
  void kick() { watcher_->kick(); }
  void kick_soon() { watcher_->kick_soon(); }

  // A new request (a SessionRequest) that completes `handler` on the
  // awaiting coroutine's executor, or nullptr when the session is down
  // (no handle, or not alive): then the handler fails with ENOTCONN, posted,
  // never in the caller's frame.
  template <class Request, class H>
  [[nodiscard]] std::unique_ptr<Request> new_request(H handler, bool have_handle) {
    boost::asio::any_io_executor ex = boost::asio::get_associated_executor(handler, io_.get_executor());
    if (!have_handle || !alive()) {
      boost::asio::post(ex, [h = std::move(handler)]() mutable {
        std::move(h)(std::error_code(ENOTCONN, std::system_category()));
      });
      return nullptr;
    }
    auto r = std::make_unique<Request>();
    r->begin(std::move(ex), std::move(handler));
    return r;
  }

  // shared_from_this() as the derived type.
  template <class Self>
  [[nodiscard]] std::shared_ptr<Self> self() {
    return std::static_pointer_cast<Self>(shared_from_this());
  }

  boost::asio::io_context& io_;
  const std::string name_;
  std::shared_ptr<spdlog::logger> log_;

 private:
  std::shared_ptr<FdWatcher> watcher_;
  std::atomic<bool> alive_{false};
};

// What a blocking connect gives: a library handle, or the errno and message
// of why there is none.
template <class Handle>
struct Connected {
  Handle handle{};
  int err = 0;
  std::string message;
  [[nodiscard]] explicit operator bool() const noexcept { return static_cast<bool>(handle); }
};

// Connects until there are `count` handles, the first being `first` (made by
// the caller, who needed it to learn the count): connect(i) makes handle i.
// A failure throws what failed(i, message) returns.
template <class Handle, class Connect, class Failed>
std::vector<Handle> connect_all(Handle first, size_t count, Connect connect, Failed failed) {
  std::vector<Handle> handles;
  handles.push_back(std::move(first));
  while (handles.size() < count) {
    Connected<Handle> more = connect(handles.size());
    if (!more) throw failed(handles.size(), more.message);
    handles.push_back(std::move(more.handle));
  }
  return handles;
}

// What reconnect() returns when a fresh connect failed with `err`: that
// error when it means "the remote is not reachable", else ECONNREFUSED (so
// RetryLayer keeps trying).
[[nodiscard]] inline std::error_code reconnect_failure(int err) noexcept {
  const std::error_code ec(err, std::system_category());
  return core::is_connection_error(ec) ? ec : std::error_code(ECONNREFUSED, std::system_category());
}

// Runs `task` on the session's loop and resumes the caller on its own: a
// request that arrives on another loop hops over and back. Not a coroutine
// itself, so it adds no frame.
template <class T>
[[nodiscard]] core::Task<T> on_loop_of(const LoopSession& session, core::Task<T> task) {
  return boost::asio::co_spawn(session.executor(), std::move(task), boost::asio::use_awaitable);
}

template <class Session>
class SessionSet {
 public:
  // Makes one session per handle, round-robin over the loops, and installs
  // the handles (before the loops run). make(io, name) makes a session named
  // `name`: "URI #N".
  template <class Handle, class Make>
  void open(std::vector<Handle> handles, core::EventLoops& loops, const std::string& name, Make make) {
    for (size_t i = 0; i < handles.size(); ++i) {
      std::shared_ptr<Session> s = make(loops.at(i % loops.size()), name + " #" + std::to_string(i + 1));
      s->install(std::move(handles[i]));
      sessions_.push_back(std::move(s));
    }
  }

  [[nodiscard]] size_t size() const noexcept { return sessions_.size(); }
  [[nodiscard]] Session& operator[](size_t i) const noexcept { return *sessions_[i]; }
  [[nodiscard]] bool all_alive() const noexcept {
    return std::all_of(sessions_.begin(), sessions_.end(), [](const auto& s) { return s->alive(); });
  }

  // The calling loop's session, else the next one round-robin.
  [[nodiscard]] Session& pick() noexcept {
    for (auto& s : sessions_)
      if (s->on_this_thread()) return *s;
    return *sessions_[next_.fetch_add(1, std::memory_order_relaxed) % sessions_.size()];
  }

  // The calling loop's session while it is alive, else the next live one
  // round-robin; with none alive, any (its requests fail fast).
  [[nodiscard]] Session& pick_live() noexcept {
    for (auto& s : sessions_)
      if (s->on_this_thread() && s->alive()) return *s;
    const size_t n = sessions_.size();
    const size_t start = next_.fetch_add(1, std::memory_order_relaxed);
    for (size_t i = 0; i < n; ++i)
      if (sessions_[(start + i) % n]->alive()) return *sessions_[(start + i) % n];
    return *sessions_[start % n];
  }

  // Installs `handle` in session i on its loop and waits for it.
  template <class Handle>
  core::Task<void> install(size_t i, Handle handle) {
    auto task = install_on(sessions_[i], std::move(handle));  // outside the co_await (GCC 12)
    co_await on_loop_of(*sessions_[i], std::move(task));
  }

  // Runs f(session) on every session's loop in turn and waits for each.
  template <class F>
  core::Task<void> on_each(F f) {
    for (auto& s : sessions_) {
      auto task = run_on(s, f);  // outside the co_await (GCC 12)
      co_await on_loop_of(*s, std::move(task));
    }
  }

  // Fails every request and closes every handle: the device's destructor,
  // after the loops stopped.
  void kill_all(int err, const std::string& why) {
    for (auto& s : sessions_) s->kill(err, why);
  }

  // Counts the sessions made so far (RemoteDevice::generation()).
  [[nodiscard]] uint64_t generation() const noexcept { return generation_.load(std::memory_order_acquire); }
  uint64_t next_generation() noexcept { return generation_.fetch_add(1, std::memory_order_acq_rel) + 1; }

 private:
  template <class Handle>
  static core::Task<void> install_on(std::shared_ptr<Session> s, Handle handle) {
    s->install(std::move(handle));
    co_return;
  }
  template <class F>
  static core::Task<void> run_on(std::shared_ptr<Session> s, F f) {
    f(*s);
    co_return;
  }

  std::vector<std::shared_ptr<Session>> sessions_;
  std::atomic<size_t> next_{0};
  std::atomic<uint64_t> generation_{1};
};

}  // namespace blockway::remote::common
