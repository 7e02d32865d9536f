// PluginStack: the export stack blockwayd builds, inside nbdkit: built by
// stack/export_stack.hpp, the same code the daemon's StackBuilder builds its
// exports with (the backend the URI names or the stand-in of an export
// detached in an earlier run, a RetryLayer above a network backend, the
// CacheLayer with its prefetch and detach when cache=DIR is given, the
// QosLayer and the CheckedDevice on top), so the options, their order and
// the messages are the daemon's.
//
// Thread model: nbdkit calls the plugin from its own worker threads
// (NBDKIT_THREAD_MODEL_PARALLEL). The stack runs on its own event loops
// (core::EventLoops, run by one thread of ours); run() posts a request's
// coroutine to a connection's loop and blocks the calling nbdkit thread on
// its future until the loop has finished it: no busy waiting, and the stack
// sees the same threads and executors as in blockwayd. Built and closed on
// nbdkit's main thread (.after_fork, .cleanup).
#pragma once

#include "cache/cache_layer.hpp"
#include "cache/meta_store.hpp"
#include "core/checked_device.hpp"
#include "core/event_loops.hpp"
#include "nbdkit/plugin_config.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <functional>
#include <memory>
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
  // The loop a new connection's requests run on (round robin).
  [[nodiscard]] boost::asio::io_context& next_loop() { return loops_.next(); }

  // Runs `task` on `loop` and waits for its result on the calling thread.
  template <class T>
  T run(boost::asio::io_context& loop, core::Task<T> task) {
    return boost::asio::co_spawn(loop, std::move(task), boost::asio::use_future).get();
  }

  // Flushes the stack (what a write mode keeps back reaches where it
  // promises), closes it (the cache stops its background work and persists
  // its state) and stops the loops. Once; the destructor calls it too.
  void close();

 private:
  void build();

  PluginConfig cfg_;
  core::EventLoops loops_;
  std::unique_ptr<cache::MetaStore> catalogue_;
  std::shared_ptr<core::CheckedDevice> device_;
  std::function<void()> follow_size_;
  cache::CacheLayer* cache_ = nullptr;  // owned by device_'s chain
  std::thread runner_;
  bool closed_ = false;
};

}  // namespace blockway::nbdkit
