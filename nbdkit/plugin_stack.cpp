#include "nbdkit/plugin_stack.hpp"

#include "core/logging.hpp"
#include "remote/nbd/nbd_device.hpp"
#include "stack/export_stack.hpp"

#include <mutex>
#include <vector>

namespace blockway::nbdkit {

PluginStack::PluginStack(PluginConfig cfg) : cfg_(std::move(cfg)), loops_(cfg_.threads, 4) {
  build();
  runner_ = std::thread([this] {
    try {
      loops_.run();
    } catch (const std::exception& e) {
      core::logger("nbdkit")->critical("event loops stopped: {}", e.what());
    }
  });
  if (cache_) cache_->start();
}

PluginStack::~PluginStack() { close(); }

uint64_t PluginStack::size_for_new_connection() {
  if (follow_size_) follow_size_();
  return device_->geometry().size;
}

namespace {

// A thread's io_context outlives the thread. A loop that resumes a request's
// coroutine on its worker thread (the hop back from a remote's session)
// releases its hold on the worker's io_context a moment after, possibly
// after run() returned and the thread exited: an io_context destroyed with
// the thread (a plain thread_local) was used after free (ASan, the unit test
// RunRunsTheRequestOnTheCallingThreadAndComesBackThereAfterAHop). So a
// thread leases one from this pool and gives it back when it exits, for the
// next thread to run; the pool, as many contexts as threads ever ran at
// once, lives until the process ends.
class ContextPool {
 public:
  std::unique_ptr<boost::asio::io_context> take() {
    {
      const std::lock_guard lock(mutex_);
      if (!idle_.empty()) {
        auto io = std::move(idle_.back());
        idle_.pop_back();
        return io;
      }
    }
    // Concurrency hint 1: only the leasing thread runs it; posts from our
    // loops (a remote's completion, a waiter woken elsewhere) still lock.
    return std::make_unique<boost::asio::io_context>(1);
  }
  void give_back(std::unique_ptr<boost::asio::io_context> io) {
    const std::lock_guard lock(mutex_);
    idle_.push_back(std::move(io));
  }
  static ContextPool& instance() {
    static auto* pool = new ContextPool;  // never destroyed: see above
    return *pool;
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<boost::asio::io_context>> idle_;
};

struct ContextLease {
  std::unique_ptr<boost::asio::io_context> io = ContextPool::instance().take();
  ContextLease() = default;
  ContextLease(const ContextLease&) = delete;
  ContextLease& operator=(const ContextLease&) = delete;
  ~ContextLease() { ContextPool::instance().give_back(std::move(io)); }
};

// The calling thread's leased io_context, once it has one.
thread_local boost::asio::io_context* t_leased = nullptr;

}  // namespace

boost::asio::io_context& PluginStack::thread_context() {
  thread_local ContextLease lease;
  t_leased = lease.io.get();
  return *lease.io;
}

boost::asio::io_context* PluginStack::running_context() {
  boost::asio::io_context* io = t_leased;
  return io != nullptr && io->get_executor().running_in_this_thread() ? io : nullptr;
}

// The stack blockwayd builds (stack/export_stack.hpp) with nothing of the
// daemon's around it: no run-time settings, access rules or remote bandwidth
// cap, and the catalogue only when there is a cache.
void PluginStack::build() {
  auto values = cfg_.options;
  core::Options options(values, cfg_.where());
  const stack::Context ctx{loops_, [this]() -> cache::MetaStore& {
                             if (!catalogue_) catalogue_ = stack::open_catalogue(cfg_.data_dir);
                             return *catalogue_;
                           }};
  auto built = stack::build({cfg_.name, cfg_.uri, cfg_.read_only}, options, ctx);
  cache_ = built.cache;
  // An uncached NBD remote that offers multi-conn: each nbdkit worker thread
  // gets a connection of its own, driven from its io_context (see
  // run_request()), so its requests run inline too.
  bool own_connections = false;
  if (cache_ == nullptr)
    if (auto* nbd = dynamic_cast<remote::nbd::NbdDevice*>(built.remote))
      own_connections = nbd->serve_callers(&PluginStack::running_context);
  inline_requests_ = cache_ != nullptr || cfg_.uri.starts_with("file:") || own_connections;
  device_ = std::move(built.device);
  follow_size_ = std::move(built.follow_size);
  if (built.remote) {
    // A backend that watches its image (rbd): as in blockwayd
    // (StackBuilder::resize_handler), an uncached stack grows with it; a
    // cached one keeps its size until nbdkit starts again.
    built.remote->set_resize_handler([weak = std::weak_ptr(device_), cached = cache_ != nullptr,
                                      where = cfg_.where()](uint64_t, uint64_t new_size) {
      if (cached)
        return where + " has a cache, whose file and block maps cannot grow while served; start nbdkit again to "
                       "serve the new size (the cache grows with it and keeps its data)";
      if (auto d = weak.lock()) d->grow(new_size);
      return std::string();
    });
  }
  core::logger("nbdkit")->info("{}: {} ({} bytes{})", cfg_.where(), device_->describe(), device_->geometry().size,
                               device_->capabilities().read_only ? ", read-only" : "");
}

void PluginStack::close() {
  if (closed_) return;
  closed_ = true;
  auto log = core::logger("nbdkit");
  try {
    auto& loop = loops_.at(0);
    auto& dev = *device_;
    if (!dev.capabilities().read_only && dev.capabilities().flush != core::Support::none) {
      if (auto ec = run_on(loop, dev.flush())) log->error("{}: flush at close: {}", cfg_.where(), ec.message());
    }
    run_on(loop, dev.close());
  } catch (const std::exception& e) {
    log->error("{}: close: {}", cfg_.where(), e.what());
  }
  loops_.release();
  if (runner_.joinable()) runner_.join();
}

}  // namespace blockway::nbdkit
