// PluginStack: the export stack blockwayd builds, inside nbdkit: built by
// stack/export_stack.hpp, the same code the daemon's StackBuilder builds its
// exports with (the backend the URI names or the stand-in of an export
// detached in an earlier run, a RetryLayer above a network backend, the
// CacheLayer with its prefetch and detach when cache=DIR is given, the
// QosLayer and the CheckedDevice on top), so the options, their order and
// the messages are the daemon's.
//
// Thread model: nbdkit calls the plugin from its own worker threads
// (NBDKIT_THREAD_MODEL_PARALLEL), each blocked on one request at a time.
// run() runs a request's coroutine on the calling thread, on an io_context of
// that thread's own (thread_context()), until the request is done: a cache hit or
// a local file never leaves the thread, as in blockwayd, where a request runs
// on the loop that read it. Handing every request to one of our loops and
// back (what run() did before: co_spawn + std::future) cost two thread
// switches, a wake through the loop's eventfd and a futex, plus the future's
// shared state, per request: measured 0.24x of blockwayd at 4 KiB cached
// random reads on 2 cores (bench/results/plugin.md). What must stay on a loop
// still goes there: a remote session's I/O hops to its session's loop and
// back (remote/common/loop_session.hpp, on_loop_of), except over an
// uncached NBD remote with multi-conn, where each worker thread has a
// connection of its own driven from its io_context
// (NbdDevice::serve_callers(): the hops cost ~3 context switches per 4 KiB
// request, bench/results/plugin.md); the blocking pool runs
// what blocks, the cache's background work runs on loop 0, and the
// RetryLayer's reconnect loop runs on loop 0 (reconnect_on()), never on a
// worker thread that stops running its io_context once its request is done.
// Nothing a request leaves behind outlives it on the worker's io_context:
// the stack's detached work goes to those loops. The loops themselves run
// on threads of ours (core::EventLoops, started here). Built and closed on
// nbdkit's main thread (.after_fork, .cleanup); close() runs its flush on
// loop 0 (run_on()).
#pragma once

#include "cache/cache_layer.hpp"
#include "cache/meta_store.hpp"
#include "core/checked_device.hpp"
#include "core/event_loops.hpp"
#include "nbdkit/plugin_config.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <functional>
#include <exception>
#include <memory>
#include <optional>
#include <thread>

namespace blockway::nbdkit {

class PluginStack {
 public:
  // Opens the remote and builds the stack, then starts the loops and the
  // cache's background work. Throws core::ConfigError with the daemon's message.
  explicit PluginStack(PluginConfig cfg);
  ~PluginStack();
  PluginStack(const PluginStack&) = delete;
  PluginStack& operator=(const PluginStack&) = delete;

  [[nodiscard]] core::CheckedDevice& device() const noexcept { return *device_; }
  // The size a new connection is told (nbdkit asks once per connection):
  // an uncached file:// image that grew since is followed first
  // (stack::Stack::follow_size); an rbd image's growth is followed as its
  // watch reports it. A cached stack keeps the size it opened with.
  [[nodiscard]] uint64_t size_for_new_connection();
  [[nodiscard]] const PluginConfig& config() const noexcept { return cfg_; }
  // Loop i of the stack's event loops (threads=N of them).
  [[nodiscard]] boost::asio::io_context& loop(size_t i) { return loops_.at(i); }

  // Runs `task` on the calling thread (its own io_context, run until the
  // task is done) and returns its result; an exception escaping the task is
  // rethrown here. Any thread, any number at once; not from inside a task.
  template <class T>
  T run(core::Task<T> task) {
    boost::asio::io_context& io = thread_context();
    // Work first, then restart(): the io_context stops whenever its work
    // count drops to 0, which the end of the last request did, possibly on
    // one of our loops (a hop back releases its work there) and possibly
    // late. Once this guard holds work, nothing can stop it again, so the
    // restart() below sticks and run_one() waits rather than returning.
    const auto work = boost::asio::make_work_guard(io);
    io.restart();
    Outcome<T> out;
    boost::asio::co_spawn(io, std::move(task), out.handler());
    while (!out.done)
      if (io.run_one() == 0) io.restart();  // stopped all the same: never spin on it
    return out.get();
  }

  // Runs `task` on `loop` (one of ours) and waits for its result.
  template <class T>
  T run_on(boost::asio::io_context& loop, core::Task<T> task) {
    return boost::asio::co_spawn(loop, std::move(task), boost::asio::use_future).get();
  }

  // A client's request: with a cache, over a file, or over an NBD remote
  // that gives each worker thread a connection of its own (multi-conn, no
  // connections= count: NbdDevice::serve_callers()), on the calling thread
  // (run(): a hit, a file read or a remote request on the thread's own
  // connection never leaves it); over another network remote without a
  // cache, on one of our loops (run_on()), where the remote's sessions live:
  // running it here would hop there and back, two spawns instead of one.
  // Measured on a quiet machine, 4k reads over an NBD remote on the loops'
  // sessions: 35-49 us of CPU per request inline against 31-39 on a loop; a
  // cached 4k hit 9.0 us inline against 25.6 on a loop.
  template <class T>
  T run_request(core::Task<T> task) {
    if (inline_requests_) return run(std::move(task));
    return run_on(loops_.next(), std::move(task));
  }

  // Flushes the stack (what a write mode keeps back reaches where it
  // promises), closes it (the cache stops its background work and persists
  // its state) and stops the loops. Once; the destructor calls it too.
  void close();

  // The calling thread's io_context (leased on its first request, given
  // back to a pool when the thread exits; never destroyed, see the .cpp).
  static boost::asio::io_context& thread_context();
  // The calling thread's io_context while it runs a request (inside run()),
  // else nullptr: what NbdDevice::serve_callers() asks.
  static boost::asio::io_context* running_context();

 private:
  // A task's result, filled by co_spawn's completion on the running thread.
  template <class T>
  struct Outcome {
    std::optional<T> value;
    std::exception_ptr error;
    bool done = false;
    auto handler() {
      return [this](std::exception_ptr e, T v) {
        error = std::move(e);
        if (!error) value.emplace(std::move(v));
        done = true;
      };
    }
    T get() {
      if (error) std::rethrow_exception(error);
      return std::move(*value);
    }
  };

  void build();

  PluginConfig cfg_;
  core::EventLoops loops_;
  std::unique_ptr<cache::MetaStore> catalogue_;
  std::shared_ptr<core::CheckedDevice> device_;
  std::function<void()> follow_size_;
  cache::CacheLayer* cache_ = nullptr;  // owned by device_'s chain
  bool inline_requests_ = false;        // see run_request(); set by build()
  std::thread runner_;
  bool closed_ = false;
};

template <>
struct PluginStack::Outcome<void> {
  std::exception_ptr error;
  bool done = false;
  auto handler() {
    return [this](std::exception_ptr e) {
      error = std::move(e);
      done = true;
    };
  }
  void get() {
    if (error) std::rethrow_exception(error);
  }
};

}  // namespace blockway::nbdkit
