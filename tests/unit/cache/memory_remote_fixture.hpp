// The set-up the cache layer's unit tests share: a CacheLayer, run on a
// LayerHarness, over an in-memory remote (MemoryDevice, filled with its
// pattern and counting every call) with a real SQLite catalogue in a
// temporary directory.
//
// Thread model: the test thread drives everything; requests run on the
// harness's loop thread and the test thread waits for each (LayerHarness::run).
#pragma once

#include "cache/cache_layer.hpp"

#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"
#include "tests/unit/cache/cache_test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <vector>

namespace blockway::test {

// n bytes of value v: what most cache tests write and expect back.
inline std::vector<std::byte> bytes(size_t n, uint8_t v) { return std::vector<std::byte>(n, std::byte{v}); }

// Every write mode but local, for INSTANTIATE_TEST_SUITE_P(..., kAllWriteModes, write_mode_name).
inline const auto kAllWriteModes =
    ::testing::Values(cache::WriteMode::writethrough, cache::WriteMode::writeback, cache::WriteMode::writeback_local);
// A test name for a write mode ("writeback_local").
inline std::string write_mode_name(const ::testing::TestParamInfo<cache::WriteMode>& info) {
  auto s = to_string(info.param);
  std::replace(s.begin(), s.end(), '-', '_');
  return s;
}

class MemoryRemoteLayerTest : public ::testing::Test {
 protected:
  MemoryRemoteLayerTest(uint64_t chunk_size, uint64_t size) : chunk_size_(chunk_size), size_(size) {}

  void SetUp() override {
    core::Capabilities caps;
    caps.flush = caps.fua = caps.trim = caps.zero = caps.extents = core::Support::native;
    make_remote(caps);
    store_ = std::make_unique<cache::MetaStore>(dir_.str() + "/catalogue.db");
  }
  void TearDown() override { h_.reset(); }

  void make_remote(core::Capabilities caps) {
    remote_ = std::make_shared<MemoryDevice>(core::Geometry{size_, 1, 4096, 32u << 20}, caps);
    remote_->fill_pattern(0, size_);
  }

  // Checkpoints every 50 ms, no readahead, write-back after writeback_delay_.
  cache::CacheConfig config(cache::WriteMode mode) const {
    cache::CacheConfig c;
    c.dir = dir_.str() + "/cache";
    c.mode = mode;
    c.chunk_size = chunk_size_;
    c.readahead_chunks = 0;
    c.checkpoint_interval = std::chrono::milliseconds(50);
    c.writeback_delay = writeback_delay_;
    return c;
  }
  // Opens a layer over `remote` (default: the shared in-memory remote) and
  // starts its background loop if `start`.
  cache::CacheLayer& open_layer(const cache::CacheConfig& cfg, std::unique_ptr<core::BlockDevice> remote,
                                bool start) {
    h_ = std::make_unique<LayerHarness>();
    cache::CacheLayer::Params p;
    p.export_name = "vm";
    p.remote_uri = "memory://remote";
    p.config = cfg;
    p.store = store_.get();
    if (!remote) remote = std::make_unique<SharedDevice>(remote_);
    auto& l = h_->open(std::move(remote), std::move(p));
    if (start) l.start();
    return l;
  }
  cache::CacheLayer& layer() { return h_->layer(); }

  std::vector<std::byte> read(uint64_t off, uint64_t len) {
    std::vector<std::byte> buf(len);
    auto ec = h_->run(layer().read(buf, off, 0));
    EXPECT_FALSE(ec) << ec.message();
    return buf;
  }
  std::error_code write(uint64_t off, const std::vector<std::byte>& data, core::IoFlags f = 0) {
    return h_->run(layer().write(data, off, f));
  }
  // What the remote held at the start (MemoryDevice's pattern).
  static std::vector<std::byte> pattern(uint64_t off, uint64_t len) {
    std::vector<std::byte> v(len);
    for (uint64_t i = 0; i < len; ++i) v[i] = MemoryDevice::pattern_at(off + i);
    return v;
  }
  // The cache file's bytes, as another process would read them.
  std::vector<std::byte> cache_file() const {
    std::ifstream f(dir_.str() + "/cache/vm.img", std::ios::binary);
    std::vector<char> raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::vector<std::byte> out(raw.size());
    std::memcpy(out.data(), raw.data(), raw.size());
    return out;
  }

  const uint64_t chunk_size_, size_;
  std::chrono::milliseconds writeback_delay_{0};
  TempDir dir_;
  std::shared_ptr<MemoryDevice> remote_;
  std::unique_ptr<cache::MetaStore> store_;
  std::unique_ptr<LayerHarness> h_;
};

}  // namespace blockway::test
