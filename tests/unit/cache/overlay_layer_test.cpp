// OverlayLayer: a clone's copy-on-write overlay over a base export.
//
// The base is a CheckedDevice over a MemoryDevice (so its read-only hold and
// reads can be seen); the overlay is a real sparse file and a real SQLite
// catalogue, except in the power-loss test, where the overlay image is a
// VolatileDevice that loses what was not flushed.
#include "cache/overlay_layer.hpp"

#include "tests/unit/cache/overlay_rig.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <fstream>
#include <future>
#include <optional>
#include <random>
#include <set>
#include <thread>

namespace blockway::cache {
namespace {

using core::ByteRange;
using core::ExtentList;

TEST(OverlayLayer, UnwrittenBlocksReadTheBaseAndWritesStayInTheOverlay) {
  Rig rig;
  auto& o = rig.open(16u << 10);
  const auto base_before = rig.mem().contents(0, kSize);
  EXPECT_EQ(rig.read(0, kSize), base_before);
  ASSERT_FALSE(rig.run(o.write(bytes(1000, 0xAB), 70000, 0)));
  auto want = base_before;
  std::fill_n(want.begin() + 70000, 1000, std::byte{0xAB});
  EXPECT_EQ(rig.read(0, kSize), want);
  EXPECT_EQ(rig.mem().contents(0, kSize), base_before) << "the base must never be written";
  const auto s = o.stats();
  EXPECT_EQ(s.copy_ups, 1u);
  EXPECT_EQ(s.allocated_bytes, 16u << 10);
  // The overlay file is a plain raw image: the copied-up block at its offset.
  std::ifstream f(rig.overlay_file(), std::ios::binary);
  std::vector<char> raw(kSize);
  f.read(raw.data(), static_cast<std::streamsize>(kSize));
  ASSERT_EQ(f.gcount(), static_cast<std::streamsize>(kSize));
  EXPECT_EQ(std::memcmp(raw.data() + 65536, want.data() + 65536, 16384), 0);
}

TEST(OverlayLayer, ConcurrentPartialWritesIntoOneBlockAllSurvive) {
  Rig rig;
  auto& o = rig.open(64u << 10);
  rig.mem().close_gate(test::Op::read);  // every copy-up waits at the base: they all pile up
  std::vector<std::future<std::error_code>> writes;
  std::vector<std::vector<std::byte>> data;
  for (int i = 0; i < 16; ++i) data.push_back(bytes(512, static_cast<uint8_t>(i + 1)));
  for (int i = 0; i < 16; ++i) writes.push_back(rig.spawn(o.write(data[i], 131072 + uint64_t(i) * 4096, 0)));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  rig.mem().open_gate(test::Op::read);
  for (auto& w : writes) EXPECT_FALSE(w.get());
  auto want = rig.mem().contents(0, kSize);
  for (int i = 0; i < 16; ++i) std::fill_n(want.begin() + 131072 + i * 4096, 512, std::byte(i + 1));
  EXPECT_EQ(rig.read(0, kSize), want);
  EXPECT_EQ(o.stats().copy_ups, 1u) << "one copy-up per block, single flight";
}

TEST(OverlayLayer, TrimAndZeroRecordZeroesWithoutTheBase) {
  Rig rig;
  auto& o = rig.open(16u << 10);
  rig.mem().clear_log();
  ASSERT_FALSE(rig.run(o.zero({16384, 32768}, 0)));
  ASSERT_FALSE(rig.run(o.zero({100, 50}, 0)));     // partial: a copy-up, then zeroes
  ASSERT_FALSE(rig.run(o.trim({49152, 20000}, 0)));  // one whole block and a partial one
  EXPECT_TRUE(rig.mem().log_of(test::Op::zero).empty());
  EXPECT_TRUE(rig.mem().log_of(test::Op::trim).empty());
  auto want = rig.mem().contents(0, kSize);
  std::fill_n(want.begin() + 16384, 32768 + 16384, std::byte{0});
  std::fill_n(want.begin() + 100, 50, std::byte{0});
  EXPECT_EQ(rig.read(0, kSize), want);
  // Block status: punched blocks read as zero, unwritten ones are the base's.
  rig.mem().set_extents({{kSize, core::kExtentHole}});
  ExtentList out;
  ASSERT_FALSE(rig.run(o.block_status({16384, kSize - 16384}, out)));
  ASSERT_FALSE(out.empty());
  EXPECT_TRUE(out[0].flags & core::kExtentZero) << [&] {
    std::string t;
    for (auto& e : out) t += std::to_string(e.length) + "/" + std::to_string(e.flags) + " ";
    return t;
  }();
  out.clear();
  ASSERT_FALSE(rig.run(o.block_status({65536, 16384}, out)));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0], (core::Extent{16384, core::kExtentHole}));
}

TEST(OverlayLayer, TheBaseIsReadOnlyWhileTheCloneExists) {
  Rig rig;
  EXPECT_FALSE(rig.base().capabilities().read_only);
  rig.open();
  EXPECT_TRUE(rig.base().capabilities().read_only);
  EXPECT_EQ(rig.run(rig.base().write(bytes(512, 1), 0, 0)), std::errc::operation_not_permitted);
  EXPECT_EQ(rig.run(rig.base().zero({0, 512}, 0)), std::errc::operation_not_permitted);
  rig.close();
  EXPECT_FALSE(rig.base().capabilities().read_only);
  EXPECT_FALSE(rig.run(rig.base().write(bytes(512, 1), 0, 0)));
}

TEST(OverlayLayer, PersistsAcrossReopenAndRefusesChangedSettingsWhileItHoldsWrites) {
  Rig rig;
  auto& o = rig.open(16u << 10);
  ASSERT_FALSE(rig.run(o.write(bytes(4096, 7), 8192, 0)));
  const auto before = rig.read(0, kSize);
  rig.close();
  EXPECT_EQ(rig.open(16u << 10).stats().allocated_bytes, 16u << 10);
  EXPECT_FALSE(rig.layer().stats().recovered);
  EXPECT_EQ(rig.read(0, kSize), before);
  rig.close();
  try {
    rig.open(64u << 10);
    FAIL() << "a changed granularity must not drop the clone's writes";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("holds the clone's writes"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(rig.base().capabilities().read_only) << "a failed open leaves no hold";
}

// Random writes, zeroes, trims, FUA writes and flushes, up to eight at once
// on distinct blocks (so the model is exact), checked by full reads, with an
// orderly reopen now and then.
class OverlayModel : public ::testing::TestWithParam<uint64_t> {};

TEST_P(OverlayModel, MatchesAModel) {
  const uint64_t g = GetParam();
  Rig rig;
  rig.open(g);
  auto model = rig.mem().contents(0, kSize);
  std::mt19937_64 rng(g * 977);
  const uint64_t nblocks = kSize / g;
  for (int round = 0; round < 6; ++round) {
    std::vector<std::future<std::error_code>> ops;
    std::vector<std::vector<std::byte>> keep;
    std::set<uint64_t> busy;  // blocks of the requests in flight
    keep.reserve(200);
    auto drain = [&] {
      for (auto& f : ops) ASSERT_FALSE(f.get());
      ops.clear();
      busy.clear();
    };
    for (int i = 0; i < 200; ++i) {
      const uint64_t b = rng() % nblocks;
      if (busy.size() >= 8 || busy.count(b)) drain();
      busy.insert(b);
      const uint64_t off = b * g + (rng() % (g / 512)) * 512;
      const uint64_t len = std::min<uint64_t>((1 + rng() % 16) * 512, b * g + g - off);
      const int kind = static_cast<int>(rng() % 10);
      if (kind < 6) {
        keep.push_back(bytes(len, static_cast<uint8_t>(rng() % 255 + 1)));
        std::copy(keep.back().begin(), keep.back().end(), model.begin() + static_cast<long>(off));
        ops.push_back(rig.spawn(rig.layer().write(keep.back(), off, kind == 5 ? core::kFua : 0)));
      } else if (kind < 8) {
        std::fill_n(model.begin() + static_cast<long>(off), len, std::byte{0});
        ops.push_back(rig.spawn(rig.layer().zero({off, len}, kind == 7 ? core::kNoHole : 0)));
      } else if (kind == 8) {
        std::fill_n(model.begin() + static_cast<long>(b * g), g, std::byte{0});
        ops.push_back(rig.spawn(rig.layer().trim({b * g, g}, 0)));
      } else {
        ops.push_back(rig.spawn(rig.layer().flush()));
      }
    }
    drain();
    ASSERT_EQ(rig.read(0, kSize), model) << "round " << round;
    if (round % 2 == 1) {
      rig.close();
      rig.open(g);
      ASSERT_EQ(rig.read(0, kSize), model) << "after reopen, round " << round;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Granularities, OverlayModel, ::testing::Values(4096u, 16384u, 65536u));

}  // namespace
}  // namespace blockway::cache
