// OverlayLayer::View: each snapshot read through its own read-only view,
// held open while the chain changes under it (writes, new snapshots,
// reverts, deletes of other snapshots) against a model; a view whose
// snapshot was deleted fails with EIO rather than show other data.
#include "cache/overlay_layer.hpp"

#include "tests/unit/cache/overlay_rig.hpp"

#include <gtest/gtest.h>

#include <random>
#include <string>

namespace blockway::cache {
namespace {

struct Snap {
  std::string name;
  std::vector<std::byte> content;
  std::unique_ptr<core::BlockDevice> view;
};

void expect_view(Rig& rig, core::BlockDevice& view, const std::vector<std::byte>& want, const std::string& when) {
  std::vector<std::byte> got(kSize);
  ASSERT_FALSE(rig.run(view.read(got, 0, 0))) << when;
  for (uint64_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << "byte " << i << " after " << when;
}

void randomized_views(uint64_t granularity, unsigned seed) {
  Rig rig;
  rig.open(granularity);
  std::vector<std::byte> now = rig.mem().contents(0, kSize);
  std::vector<Snap> snaps;  // oldest first
  std::mt19937_64 rng(seed);
  int taken = 0;
  for (int step = 0; step < 120; ++step) {
    const int op = static_cast<int>(rng() % 100);
    std::string what;
    if (op < 50) {
      const uint64_t off = rng() % kSize, len = std::min<uint64_t>(1 + rng() % (3 * granularity), kSize - off);
      const auto v = static_cast<uint8_t>(rng());
      ASSERT_FALSE(rig.run(rig.layer().write(bytes(len, v), off, 0)));
      std::fill_n(now.begin() + static_cast<ptrdiff_t>(off), len, std::byte{v});
      what = "write";
    } else if (op < 70) {
      const std::string n = "s" + std::to_string(++taken);
      ASSERT_TRUE(rig.run(rig.layer().snapshot(n)).ok());
      auto view = rig.layer().snapshot_view(n, nullptr);
      ASSERT_TRUE(view);
      EXPECT_TRUE(view->capabilities().read_only);
      snaps.push_back({n, now, std::move(view)});
      what = "snapshot " + n;
    } else if (op < 80 && !snaps.empty()) {
      ASSERT_TRUE(rig.run(rig.layer().revert(snaps.back().name)).ok());
      now = snaps.back().content;
      what = "revert";
    } else if (!snaps.empty()) {
      const size_t k = rng() % snaps.size();
      ASSERT_TRUE(rig.run(rig.layer().delete_snapshot(snaps[k].name)).ok());
      // The deleted snapshot's view fails; the others read as before.
      std::vector<std::byte> buf(4096);
      EXPECT_EQ(rig.run(snaps[k].view->read(buf, 0, 0)), core::errno_code(EIO));
      what = "delete " + snaps[k].name;
      snaps.erase(snaps.begin() + static_cast<ptrdiff_t>(k));
    }
    for (auto& s : snaps) expect_view(rig, *s.view, s.content, what + " (view of " + s.name + ")");
  }
  for (auto& s : snaps) {
    std::vector<std::byte> buf(4096);
    EXPECT_EQ(rig.run(s.view->write(buf, 0, 0)), core::errno_code(EROFS));
    EXPECT_EQ(rig.run(s.view->zero({0, 4096}, 0)), core::errno_code(EROFS));
  }
  EXPECT_EQ(rig.layer().snapshot_view("nothere", nullptr), nullptr);
}

TEST(OverlayView, RandomizedChainAt4k) { randomized_views(4096, 1); }
TEST(OverlayView, RandomizedChainAt64k) { randomized_views(65536, 2); }

// The view's block status stops at its own level: blocks the clone wrote
// after the snapshot report the base's (or an older level's) extents.
TEST(OverlayView, BlockStatusIsTheSnapshots) {
  Rig rig;
  rig.open(4096);
  ASSERT_FALSE(rig.run(rig.layer().zero({0, 65536}, 0)));
  ASSERT_TRUE(rig.run(rig.layer().snapshot("a")).ok());
  ASSERT_FALSE(rig.run(rig.layer().write(bytes(65536, 7), 65536, 0)));
  auto view = rig.layer().snapshot_view("a", nullptr);
  ASSERT_TRUE(view);
  core::ExtentList ext;
  ASSERT_FALSE(rig.run(view->block_status({0, 65536}, ext)));
  ASSERT_FALSE(ext.empty());
  EXPECT_TRUE(ext.front().flags & core::kExtentZero);
  std::vector<std::byte> got(65536);
  ASSERT_FALSE(rig.run(view->read(got, 65536, 0)));
  EXPECT_EQ(got, rig.mem().contents(65536, 65536));  // the base's, not the later write
}

}  // namespace
}  // namespace blockway::cache
