// Rig: an OverlayLayer over a CheckedDevice over a MemoryDevice (patterned),
// with a real catalogue, for the overlay's unit tests.
//
// Tests only: a few loop threads, a blocking pool.
#pragma once

#include "cache/overlay_layer.hpp"
#include "tests/support/memory_device.hpp"
#include "tests/support/shared_device.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/support/volatile_device.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_future.hpp>

#include <future>
#include <optional>
#include <thread>
#include <vector>

namespace blockway::cache {

inline constexpr uint64_t kSize = 1u << 20;

inline core::Capabilities memory_caps() {
  core::Capabilities c;
  c.flush = c.fua = c.trim = c.zero = c.extents = core::Support::native;
  return c;
}

// A loop with a few threads (requests really run at once), a blocking pool,
// the base and the catalogue; open() builds an overlay over them.
class Rig {
 public:
  explicit Rig(uint64_t size = kSize) : work_(io_.get_executor()) {
    for (int i = 0; i < 3; ++i) threads_.emplace_back([this] { io_.run(); });
    auto mem = std::make_unique<test::MemoryDevice>(core::Geometry{size, 512, 4096, 32u << 20}, memory_caps());
    mem->fill_pattern(0, size);
    mem_ = mem.get();
    base_ = std::make_shared<core::CheckedDevice>(std::move(mem), false);
    store_ = std::make_unique<MetaStore>(dir_.str() + "/catalogue.db");
  }
  ~Rig() {
    layer_.reset();
    work_.reset();
    io_.stop();
    for (auto& t : threads_) t.join();
    pool_.join();
  }

  // without_base: as the daemon opens a flattened clone whose base is gone.
  OverlayLayer& open(uint64_t granularity = 64u << 10, std::shared_ptr<test::VolatileDevice> file = nullptr,
                     bool without_base = false) {
    OverlayLayer::Params p;
    p.export_name = "vm1";
    p.base_name = "golden";
    p.config.dir = dir_.str() + "/overlays";
    p.config.granularity = granularity;
    p.store = store_.get();
    p.blocking = &pool_;
    p.background = io_.get_executor();
    if (file)
      p.open_overlay_file = [file](const std::string&) -> std::unique_ptr<core::BlockDevice> {
        return std::make_unique<test::SharedDevice>(file);
      };
    layer_ = std::make_unique<OverlayLayer>(without_base ? nullptr : base_, std::move(p));
    return *layer_;
  }
  void close() {
    run_void(layer_->close());
    layer_.reset();
  }
  // Kill -9 from the overlay's view: no close(), nothing more committed.
  void crash() { layer_.reset(); }

  template <class T>
  T run(core::Task<T> t) {
    return boost::asio::co_spawn(io_, std::move(t), boost::asio::use_future).get();
  }
  void run_void(core::Task<void> t) { boost::asio::co_spawn(io_, std::move(t), boost::asio::use_future).get(); }
  std::future<std::error_code> spawn(core::Task<std::error_code> t) {
    return boost::asio::co_spawn(io_, std::move(t), boost::asio::use_future);
  }

  std::vector<std::byte> read(uint64_t off, uint64_t len) {
    std::vector<std::byte> buf(len);
    EXPECT_FALSE(run(layer_->read(buf, off, 0)));
    return buf;
  }

  OverlayLayer& layer() { return *layer_; }
  core::CheckedDevice& base() { return *base_; }
  test::MemoryDevice& mem() { return *mem_; }
  MetaStore& store() { return *store_; }
  std::string overlay_file() const { return dir_.str() + "/overlays/vm1.img"; }

 private:
  test::TempDir dir_;
  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::vector<std::thread> threads_;
  boost::asio::thread_pool pool_{2};
  test::MemoryDevice* mem_ = nullptr;
  std::shared_ptr<core::CheckedDevice> base_;
  std::unique_ptr<MetaStore> store_;
  std::unique_ptr<OverlayLayer> layer_;
};

inline std::vector<std::byte> bytes(uint64_t n, uint8_t v) { return std::vector<std::byte>(n, std::byte{v}); }

}  // namespace blockway::cache
