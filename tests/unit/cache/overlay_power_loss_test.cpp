// Power-loss simulation for clone overlays (the cache's guarantees:
// DESIGN.md invariants 1, 3, 4).
//
// The overlay image is a VolatileDevice: what was not flushed is lost at a
// "crash", or partly kept, torn at sector granularity. The catalogue is a
// real SQLite file: it keeps exactly its committed transactions. The base is
// a memory device with a pattern (another export; it does not crash).
//
// Each round: random writes, FUA writes, zeroes, trims and flushes through
// an OverlayLayer, a model per sector of what was made durable and what is
// pending, then a crash: the layer is dropped without close(), the image
// loses its unflushed writes, and a new layer starts on the same catalogue
// and image. Then:
//   - every flushed or FUA write reads back, unless a later write (pending
//     at the crash) replaced it; sectors never written read the base;
//   - no flip-flop: two reads agree, and so does a read after another crash
//     with no writes in between.
#include "cache/overlay_layer.hpp"

#include "tests/support/memory_device.hpp"
#include "tests/support/shared_device.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/support/volatile_device.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <cstring>
#include <optional>
#include <random>
#include <thread>

namespace blockway::cache {
namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kSize = 512u << 10;
constexpr uint64_t kSectors = kSize / kSector;
constexpr uint32_t kBase = 0;             // the base's bytes
constexpr uint32_t kZero = 0xFFFFFFFFu;   // zeroes (write-zeroes, trim)

// The bytes of sector s as written by write `id`: its first 8 bytes name both.
std::vector<std::byte> sector_of(uint32_t id, uint64_t s) {
  std::vector<std::byte> out(kSector, std::byte{0});
  if (id == kZero) return out;
  const uint64_t head = (uint64_t{id} << 32) | s;
  for (uint64_t i = 0; i < kSector; i += 8) {
    const uint64_t v = head * 0x9E3779B97F4A7C15ull + i;
    std::memcpy(out.data() + i, &v, 8);
  }
  return out;
}

struct Sector {
  uint32_t durable = kBase;
  std::vector<uint32_t> pending;  // written since, in order
};

class OverlayPowerLoss : public ::testing::TestWithParam<uint64_t> {
 protected:
  OverlayPowerLoss() {
    auto mem = std::make_unique<test::MemoryDevice>(core::Geometry{kSize, 512, 4096, 32u << 20},
                                                    core::Capabilities{});
    mem->fill_pattern(0, kSize);
    base_bytes_ = mem->contents(0, kSize);
    base_ = std::make_shared<core::CheckedDevice>(std::move(mem), false);
    store_ = std::make_unique<MetaStore>(dir_.str() + "/catalogue.db");
    thread_ = std::thread([this] { io_.run(); });
  }
  ~OverlayPowerLoss() override {
    layer_.reset();
    work_.reset();
    thread_.join();
    pool_.join();
  }

  void open() {
    OverlayLayer::Params p;
    p.export_name = "vm1";
    p.base_name = "golden";
    p.config.dir = dir_.str();
    p.config.granularity = GetParam();
    p.store = store_.get();
    p.blocking = &pool_;
    p.open_overlay_file = [this](const std::string&) -> std::unique_ptr<core::BlockDevice> {
      return std::make_unique<test::SharedDevice>(image_);
    };
    layer_ = std::make_unique<OverlayLayer>(base_, std::move(p));
  }
  void crash(bool partial) {
    layer_.reset();
    image_->crash(rng_, partial);
    open();
  }
  template <class T>
  T run(core::Task<T> t) {
    return boost::asio::co_spawn(io_, std::move(t), boost::asio::use_future).get();
  }
  std::vector<std::byte> read_all() {
    std::vector<std::byte> buf(kSize);
    EXPECT_FALSE(run(layer_->read(buf, 0, 0)));
    return buf;
  }
  std::vector<std::byte> expected(uint32_t id, uint64_t s) const {
    if (id == kBase) return {base_bytes_.begin() + static_cast<long>(s * kSector),
                             base_bytes_.begin() + static_cast<long>((s + 1) * kSector)};
    return sector_of(id, s);
  }

  test::TempDir dir_;
  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_{io_.get_executor()};
  std::thread thread_;
  boost::asio::thread_pool pool_{2};
  std::mt19937_64 rng_{GetParam() + 12345};
  std::vector<std::byte> base_bytes_;
  std::shared_ptr<core::CheckedDevice> base_;
  std::shared_ptr<test::VolatileDevice> image_ = std::make_shared<test::VolatileDevice>(kSize);
  std::unique_ptr<MetaStore> store_;
  std::unique_ptr<OverlayLayer> layer_;
  std::vector<Sector> model_ = std::vector<Sector>(kSectors);
  uint32_t next_id_ = 1;
};

TEST_P(OverlayPowerLoss, FlushedWritesSurviveAndNothingFlipFlops) {
  const uint64_t g = GetParam();
  open();
  for (int round = 0; round < 25; ++round) {
    for (int op = 0; op < 40; ++op) {
      const int kind = static_cast<int>(rng_() % 12);
      const uint64_t s0 = rng_() % kSectors;
      const uint64_t n = std::min<uint64_t>(1 + rng_() % 24, kSectors - s0);
      if (kind < 7) {  // write, FUA one time in three
        const uint32_t id = next_id_++;
        std::vector<std::byte> buf;
        for (uint64_t s = s0; s < s0 + n; ++s) {
          auto b = sector_of(id, s);
          buf.insert(buf.end(), b.begin(), b.end());
        }
        const bool fua = kind < 2;
        ASSERT_FALSE(run(layer_->write(buf, s0 * kSector, fua ? core::kFua : 0)));
        for (uint64_t s = s0; s < s0 + n; ++s) {
          if (fua) {
            model_[s].durable = id;
            model_[s].pending.clear();
          } else {
            model_[s].pending.push_back(id);
          }
        }
      } else if (kind < 9) {  // zeroes, punched or not
        ASSERT_FALSE(run(layer_->zero({s0 * kSector, n * kSector}, kind == 8 ? core::kNoHole : 0)));
        for (uint64_t s = s0; s < s0 + n; ++s) model_[s].pending.push_back(kZero);
      } else if (kind == 9) {  // trim: whole blocks read as zeroes
        const uint64_t first = (s0 * kSector + g - 1) / g * g, end = (s0 + n) * kSector / g * g;
        ASSERT_FALSE(run(layer_->trim({s0 * kSector, n * kSector}, 0)));
        for (uint64_t pos = first; pos < end; pos += kSector) model_[pos / kSector].pending.push_back(kZero);
      } else {
        ASSERT_FALSE(run(layer_->flush()));
        for (auto& m : model_) {
          if (!m.pending.empty()) m.durable = m.pending.back();
          m.pending.clear();
        }
      }
    }
    crash(rng_() % 2 == 0);
    const auto seen = read_all();
    for (uint64_t s = 0; s < kSectors; ++s) {
      auto& m = model_[s];
      const std::vector<std::byte> got(seen.begin() + static_cast<long>(s * kSector),
                                       seen.begin() + static_cast<long>((s + 1) * kSector));
      std::optional<uint32_t> match;
      if (got == expected(m.durable, s)) match = m.durable;
      for (uint32_t id : m.pending)
        if (!match && got == expected(id, s)) match = id;
      ASSERT_TRUE(match) << "round " << round << ": sector " << s << " (granularity " << g
                         << ") reads neither its flushed write " << m.durable << " nor a later one ("
                         << m.pending.size() << " pending)";
      m.durable = *match;
      m.pending.clear();
    }
    ASSERT_EQ(read_all(), seen) << "flip-flop between two reads, round " << round;
    crash(true);
    ASSERT_EQ(read_all(), seen) << "flip-flop across a crash without writes, round " << round;
  }
  EXPECT_GT(layer_->stats().allocated_bytes, 0u);
}

INSTANTIATE_TEST_SUITE_P(Granularities, OverlayPowerLoss, ::testing::Values(4096u, 65536u));

}  // namespace
}  // namespace blockway::cache
