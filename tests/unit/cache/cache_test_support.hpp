// Test doubles and a harness shared by the cache unit tests.
//
// SharedDevice: a BlockDevice handle that forwards to a device owned
// elsewhere, so one remote (or one cache image) outlives several CacheLayer
// incarnations.
// VolatileDevice: an in-memory image with a disk's volatile write cache: it
// keeps a durable image and a current one; write/zero change the current one
// (and log the change as pending); flush() makes the current one durable; a
// FUA write is durable at once. crash() models power loss: the current image
// goes back to the durable one, and optionally a random subset of the pending
// changes (whole, torn at sector granularity, or not at all) is applied.
// LayerHarness: a background io_context on its own thread (where the layer's
// write-back and checkpoints run), a blocking pool, and a way to run requests
// there and to "crash" (drop every piece of state without close()).
//
// Thread model: the devices are called from the harness's threads while the
// test thread inspects them: all their state is under a mutex.
#pragma once

#include "cache/cache_layer.hpp"
#include "cache/meta_store.hpp"
#include "gateway/block_device.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_future.hpp>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

namespace blockway::test {

class SharedDevice final : public gateway::BlockDevice {
 public:
  explicit SharedDevice(std::shared_ptr<gateway::BlockDevice> d) : d_(std::move(d)) {}
  [[nodiscard]] gateway::Geometry geometry() const noexcept override { return d_->geometry(); }
  [[nodiscard]] gateway::Capabilities capabilities() const noexcept override { return d_->capabilities(); }
  [[nodiscard]] std::string describe() const override { return d_->describe(); }
  gateway::Task<std::error_code> read(std::span<std::byte> b, uint64_t o, gateway::IoFlags f) override {
    return d_->read(b, o, f);
  }
  gateway::Task<std::error_code> write(std::span<const std::byte> b, uint64_t o, gateway::IoFlags f) override {
    return d_->write(b, o, f);
  }
  gateway::Task<std::error_code> flush() override { return d_->flush(); }
  gateway::Task<std::error_code> trim(gateway::ByteRange r, gateway::IoFlags f) override { return d_->trim(r, f); }
  gateway::Task<std::error_code> zero(gateway::ByteRange r, gateway::IoFlags f) override { return d_->zero(r, f); }
  gateway::Task<std::error_code> block_status(gateway::ByteRange r, gateway::ExtentList& out) override {
    return d_->block_status(r, out);
  }
  gateway::Task<std::error_code> prefetch(gateway::ByteRange r) override { return d_->prefetch(r); }

 private:
  std::shared_ptr<gateway::BlockDevice> d_;
};

class VolatileDevice final : public gateway::BlockDevice {
 public:
  static constexpr uint64_t kSector = 512;

  explicit VolatileDevice(uint64_t size) : durable_(size), current_(size) {}

  [[nodiscard]] gateway::Geometry geometry() const noexcept override {
    return {durable_.size(), 1, 4096, 32u << 20};
  }
  [[nodiscard]] gateway::Capabilities capabilities() const noexcept override {
    gateway::Capabilities c;
    c.flush = c.fua = c.zero = c.trim = gateway::Support::native;
    c.multi_conn = true;
    return c;
  }
  [[nodiscard]] std::string describe() const override { return "volatile"; }

  gateway::Task<std::error_code> read(std::span<std::byte> b, uint64_t o, gateway::IoFlags) override {
    std::lock_guard l(mu_);
    if (fail_.load()) co_return gateway::errno_code(EIO);
    if (o + b.size() > current_.size()) co_return gateway::errno_code(EIO);
    std::memcpy(b.data(), current_.data() + o, b.size());
    ++reads_;
    co_return std::error_code{};
  }
  gateway::Task<std::error_code> write(std::span<const std::byte> b, uint64_t o, gateway::IoFlags f) override {
    co_return apply_op(o, std::vector<std::byte>(b.begin(), b.end()), f);
  }
  gateway::Task<std::error_code> zero(gateway::ByteRange r, gateway::IoFlags f) override {
    co_return apply_op(r.offset, std::vector<std::byte>(r.length), f);
  }
  gateway::Task<std::error_code> trim(gateway::ByteRange r, gateway::IoFlags f) override {
    co_return apply_op(r.offset, std::vector<std::byte>(r.length), f);
  }
  gateway::Task<std::error_code> flush() override {
    std::lock_guard l(mu_);
    if (fail_.load()) co_return gateway::errno_code(EIO);
    durable_ = current_;
    pending_.clear();
    ++flushes_;
    co_return std::error_code{};
  }
  gateway::Task<std::error_code> block_status(gateway::ByteRange r, gateway::ExtentList& out) override {
    out.push_back({r.length, 0});
    co_return std::error_code{};
  }
  gateway::Task<std::error_code> prefetch(gateway::ByteRange) override { co_return std::error_code{}; }

  // --- test controls ---
  void set_failing(bool on) { fail_.store(on); }
  // Power loss. With partial=false every pending change is lost; with
  // partial=true each pending change is kept, lost, or torn at random.
  void crash(std::mt19937_64& rng, bool partial) {
    std::lock_guard l(mu_);
    current_ = durable_;
    if (partial) {
      for (const auto& p : pending_) {
        const int how = static_cast<int>(rng() % 3);
        if (how == 0) continue;
        for (uint64_t s = 0; s < p.data.size(); s += kSector) {
          if (how == 2 && rng() % 2) continue;
          const uint64_t n = std::min<uint64_t>(kSector, p.data.size() - s);
          std::memcpy(current_.data() + p.offset + s, p.data.data() + s, n);
        }
      }
    }
    durable_ = current_;
    pending_.clear();
  }
  void fill_both(const std::vector<std::byte>& image) {
    std::lock_guard l(mu_);
    durable_ = current_ = image;
    pending_.clear();
  }
  std::vector<std::byte> durable(uint64_t o, uint64_t n) const {
    std::lock_guard l(mu_);
    return {durable_.begin() + static_cast<long>(o), durable_.begin() + static_cast<long>(o + n)};
  }
  std::vector<std::byte> current(uint64_t o, uint64_t n) const {
    std::lock_guard l(mu_);
    return {current_.begin() + static_cast<long>(o), current_.begin() + static_cast<long>(o + n)};
  }
  uint64_t flushes() const {
    std::lock_guard l(mu_);
    return flushes_;
  }
  uint64_t reads() const {
    std::lock_guard l(mu_);
    return reads_;
  }
  size_t pending() const {
    std::lock_guard l(mu_);
    return pending_.size();
  }

 private:
  struct Pending {
    uint64_t offset;
    std::vector<std::byte> data;
  };
  std::error_code apply_op(uint64_t o, std::vector<std::byte> data, gateway::IoFlags f) {
    std::lock_guard l(mu_);
    if (fail_.load()) return gateway::errno_code(EIO);
    if (o + data.size() > current_.size()) return gateway::errno_code(EIO);
    std::memcpy(current_.data() + o, data.data(), data.size());
    if (f & gateway::kFua)
      std::memcpy(durable_.data() + o, data.data(), data.size());
    else
      pending_.push_back({o, std::move(data)});
    return {};
  }

  mutable std::mutex mu_;
  std::vector<std::byte> durable_, current_;
  std::vector<Pending> pending_;
  std::atomic<bool> fail_{false};
  uint64_t flushes_ = 0, reads_ = 0;
};

// A temporary directory removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    path_ = std::filesystem::temp_directory_path() /
            ("bw-cache-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  [[nodiscard]] std::string str() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

// One "daemon run": a background loop thread, a blocking pool, a layer.
class LayerHarness {
 public:
  LayerHarness()
      : io_(std::make_unique<boost::asio::io_context>()),
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
  cache::CacheLayer& open(std::unique_ptr<gateway::BlockDevice> remote, cache::CacheLayer::Params p) {
    p.blocking = pool_.get();
    p.background = io_->get_executor();
    layer_ = std::make_unique<cache::CacheLayer>(std::move(remote), std::move(p));
    return *layer_;
  }
  cache::CacheLayer& layer() { return *layer_; }
  [[nodiscard]] bool has_layer() const { return layer_ != nullptr; }

  // Runs a request on the background loop and waits for it.
  template <class T>
  T run(gateway::Task<T> task) {
    return boost::asio::co_spawn(*io_, std::move(task), boost::asio::use_future).get();
  }
  void run_void(gateway::Task<void> task) {
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
  // either way), the loop and every coroutine frame on it are destroyed, and
  // then the layer - without close().
  void crash() {
    if (!io_) return;
    io_->stop();
    if (thread_.joinable()) thread_.join();
    pool_->join();
    work_.reset();
    io_.reset();
    layer_.reset();
    pool_.reset();
  }

 private:
  std::unique_ptr<boost::asio::io_context> io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::unique_ptr<boost::asio::thread_pool> pool_;
  std::thread thread_;
  std::unique_ptr<cache::CacheLayer> layer_;
};

}  // namespace blockway::test
