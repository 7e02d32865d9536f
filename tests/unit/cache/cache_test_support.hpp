// A harness for the cache unit tests.
//
// LayerHarness: a background io_context on its own thread (where the layer's
// write-back and checkpoints run), a blocking pool, and a way to run requests
// there and to "crash" (drop every piece of state without close()).
//
// The devices it is used with live in tests/support/ (SharedDevice,
// VolatileDevice, MemoryDevice), as does TempDir.
#pragma once

#include "cache/cache_layer.hpp"
#include "cache/meta_store.hpp"
#include "core/block_device.hpp"
#include "tests/support/shared_device.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/support/volatile_device.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_future.hpp>

#include <memory>
#include <optional>
#include <thread>

namespace blockway::test {

// An io_context whose handlers can be destroyed before it is: shutdown()
// (protected in execution_context) destroys every queued handler, and with
// it every coroutine frame that waits in the queue.
class CrashableContext : public boost::asio::io_context {
 public:
  using boost::asio::execution_context::shutdown;
};

// One "daemon run": a background loop thread, a blocking pool, a layer.
class LayerHarness {
 public:
  LayerHarness()
      : io_(std::make_unique<CrashableContext>()),
        work_(std::in_place, io_->get_executor()),
        pool_(std::make_unique<boost::asio::thread_pool>(2)) {
    thread_ = std::thread([this] { io_->run(); });
  }
  ~LayerHarness() { crash(); }
  LayerHarness(const LayerHarness&) = delete;
  LayerHarness& operator=(const LayerHarness&) = delete;

  boost::asio::io_context& io() { return *io_; }
  boost::asio::thread_pool& pool() { return *pool_; }

  // Builds the layer (exceptions propagate).
  cache::CacheLayer& open(std::unique_ptr<core::BlockDevice> remote, cache::CacheLayer::Params p) {
    p.blocking = pool_.get();
    p.background = io_->get_executor();
    layer_ = std::make_unique<cache::CacheLayer>(std::move(remote), std::move(p));
    return *layer_;
  }
  cache::CacheLayer& layer() { return *layer_; }
  [[nodiscard]] bool has_layer() const { return layer_ != nullptr; }

  // Runs a request on the background loop and waits for it.
  template <class T>
  T run(core::Task<T> task) {
    return boost::asio::co_spawn(*io_, std::move(task), boost::asio::use_future).get();
  }
  void run_void(core::Task<void> task) {
    boost::asio::co_spawn(*io_, std::move(task), boost::asio::use_future).get();
  }

  // Orderly stop: close() then destroy.
  void close() {
    if (!layer_) return;
    run_void(layer_->close());
    crash();
  }

  // Unclean stop (the layer's view of kill -9): the loop stops wherever it
  // is, the blocking pool finishes what it runs (a SQLite commit is atomic
  // either way), every coroutine frame is destroyed, then the layer -
  // without close() - and then the loop. The frames go first, as they point
  // into the layer; those waiting on an event the layer owns (a fill's, see
  // SharedEvent::wait_unowned) are reached through the layer
  // (abandon_waiters()), which posts their destruction to the loop: the
  // loop's shutdown() destroys what it holds. Destroying the loop before the
  // layer had those posts reach a freed loop (a segfault in 1 of ~25 runs of
  // PowerLoss/writeback_background_outages).
  void crash() {
    if (!io_) return;
    io_->stop();
    if (thread_.joinable()) thread_.join();
    pool_->join();
    work_.reset();
    io_->shutdown();
    if (layer_) layer_->abandon_waiters();
    io_->shutdown();
    layer_.reset();
    io_.reset();
    pool_.reset();
  }

 private:
  std::unique_ptr<CrashableContext> io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::unique_ptr<boost::asio::thread_pool> pool_;
  std::thread thread_;
  std::unique_ptr<cache::CacheLayer> layer_;
};

}  // namespace blockway::test
