// OverlayLayer snapshots: the chain of overlays (snapshot, revert, delete =
// merge into the level above) against a model, across reopen and crash, and
// a delete under concurrent writers and readers.
#include "cache/overlay_layer.hpp"

#include "tests/unit/cache/overlay_rig.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <random>
#include <string>

namespace blockway::cache {
namespace {

// The content the clone must show, and each snapshot's.
struct Model {
  std::vector<std::byte> now;
  std::vector<std::pair<std::string, std::vector<std::byte>>> snaps;  // oldest first
};

void expect_content(Rig& rig, const std::vector<std::byte>& want, const std::string& when) {
  const auto got = rig.read(0, kSize);
  ASSERT_EQ(got.size(), want.size());
  for (uint64_t i = 0; i < want.size(); ++i)
    ASSERT_EQ(got[i], want[i]) << "first difference at byte " << i << " after " << when;
}

std::vector<std::string> names(const OverlayLayer& o) {
  std::vector<std::string> out;
  for (const auto& s : o.snapshots()) out.push_back(s.name);
  return out;
}

std::vector<std::string> names(const Model& m) {
  std::vector<std::string> out;
  for (const auto& s : m.snaps) out.push_back(s.first);
  return out;
}

void randomized_chain(uint64_t granularity, unsigned seed) {
  Rig rig;
  rig.open(granularity);
  const auto base_before = rig.mem().contents(0, kSize);
  Model m{base_before, {}};
  std::mt19937_64 rng(seed);
  int taken = 0;
  for (int step = 0; step < 160; ++step) {
    const int op = static_cast<int>(rng() % 100);
    std::string what;
    if (op < 45) {
      const uint64_t off = rng() % kSize, len = std::min<uint64_t>(1 + rng() % (3 * granularity), kSize - off);
      const auto v = static_cast<uint8_t>(rng());
      ASSERT_FALSE(rig.run(rig.layer().write(bytes(len, v), off, 0)));
      std::fill_n(m.now.begin() + static_cast<ptrdiff_t>(off), len, std::byte{v});
      what = "write " + std::to_string(off) + "+" + std::to_string(len);
    } else if (op < 55) {
      const uint64_t off = rng() % kSize, len = std::min<uint64_t>(1 + rng() % (2 * granularity), kSize - off);
      ASSERT_FALSE(rig.run(rig.layer().zero({off, len}, 0)));
      std::fill_n(m.now.begin() + static_cast<ptrdiff_t>(off), len, std::byte{0});
      what = "zero";
    } else if (op < 70) {
      const std::string n = "s" + std::to_string(++taken);
      const auto r = rig.run(rig.layer().snapshot(n));
      ASSERT_TRUE(r.ok()) << r.message;
      m.snaps.emplace_back(n, m.now);
      what = "snapshot " + n;
    } else if (op < 80 && !m.snaps.empty()) {
      const auto r = rig.run(rig.layer().revert(m.snaps.back().first));
      ASSERT_TRUE(r.ok()) << r.message;
      m.now = m.snaps.back().second;
      what = "revert";
    } else if (op < 90 && !m.snaps.empty()) {
      const size_t k = rng() % m.snaps.size();
      const auto r = rig.run(rig.layer().delete_snapshot(m.snaps[k].first));
      ASSERT_TRUE(r.ok()) << r.message;
      what = "delete " + m.snaps[k].first + " (" + std::to_string(k) + " of " + std::to_string(m.snaps.size()) + ")";
      m.snaps.erase(m.snaps.begin() + static_cast<ptrdiff_t>(k));
    } else if (op < 95) {
      ASSERT_FALSE(rig.run(rig.layer().flush()));
      rig.close();
      rig.open(granularity);
      what = "reopen";
    } else {
      // Kill -9 after a flush: everything flushed, snapshots included, survives.
      ASSERT_FALSE(rig.run(rig.layer().flush()));
      rig.crash();
      rig.open(granularity);
      what = "crash";
    }
    ASSERT_EQ(names(rig.layer()), names(m)) << what;
    expect_content(rig, m.now, what);
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_EQ(rig.mem().contents(0, kSize), base_before) << "the base must never be written";
  // Every snapshot still holds its content: revert to each, newest first.
  while (!m.snaps.empty()) {
    const auto r = rig.run(rig.layer().revert(m.snaps.back().first));
    ASSERT_TRUE(r.ok()) << r.message;
    expect_content(rig, m.snaps.back().second, "revert to " + m.snaps.back().first);
    ASSERT_TRUE(rig.run(rig.layer().delete_snapshot(m.snaps.back().first)).ok());
    expect_content(rig, m.snaps.back().second, "delete of " + m.snaps.back().first);
    m.snaps.pop_back();
  }
}

TEST(OverlaySnapshots, RandomizedChainMatchesTheModel4k) { randomized_chain(4096, 1); }
TEST(OverlaySnapshots, RandomizedChainMatchesTheModel16k) { randomized_chain(16u << 10, 2); }
TEST(OverlaySnapshots, RandomizedChainMatchesTheModel64k) { randomized_chain(64u << 10, 3); }

TEST(OverlaySnapshots, RefusalsNameTheProblem) {
  Rig rig;
  auto& o = rig.open();
  EXPECT_EQ(rig.run(o.snapshot("")).ec.value(), EINVAL);
  EXPECT_EQ(rig.run(o.snapshot("a/b")).ec.value(), EINVAL);
  EXPECT_EQ(rig.run(o.snapshot(".hidden")).ec.value(), EINVAL);
  ASSERT_TRUE(rig.run(o.snapshot("one")).ok());
  const auto dup = rig.run(o.snapshot("one"));
  EXPECT_EQ(dup.ec.value(), EEXIST);
  EXPECT_NE(dup.message.find("already has a snapshot 'one'"), std::string::npos) << dup.message;
  ASSERT_TRUE(rig.run(o.snapshot("two")).ok());
  const auto old = rig.run(o.revert("one"));
  EXPECT_EQ(old.ec.value(), EBUSY);
  EXPECT_NE(old.message.find("'two'"), std::string::npos) << old.message;
  EXPECT_EQ(rig.run(o.revert("nope")).ec.value(), ENOENT);
  EXPECT_EQ(rig.run(o.delete_snapshot("nope")).ec.value(), ENOENT);
}

TEST(OverlaySnapshots, SnapshotIsDurableWithoutAFlushAndWritesBeforeItAreIn) {
  Rig rig;
  auto& o = rig.open(16u << 10);
  ASSERT_FALSE(rig.run(o.write(bytes(8192, 0x11), 4096, 0)));
  // No flush: taking the snapshot commits what was written before it.
  ASSERT_TRUE(rig.run(o.snapshot("s")).ok());
  ASSERT_FALSE(rig.run(rig.layer().write(bytes(4096, 0x22), 8192, 0)));
  rig.crash();  // the write after the snapshot was never flushed
  rig.open(16u << 10);
  auto want = rig.mem().contents(0, kSize);
  std::fill_n(want.begin() + 4096, 8192, std::byte{0x11});
  const auto got = rig.read(0, kSize);
  // The unflushed write may or may not be there; the snapshot's content must.
  EXPECT_EQ(std::vector<std::byte>(got.begin() + 4096, got.begin() + 8192),
            std::vector<std::byte>(want.begin() + 4096, want.begin() + 8192));
  ASSERT_EQ(names(rig.layer()), std::vector<std::string>{"s"});
  ASSERT_TRUE(rig.run(rig.layer().revert("s")).ok());
  expect_content(rig, want, "revert after crash");
}

// Deleting a middle snapshot (merged into the one above) and the newest one
// (merged into the top) while writers write and readers check what does not
// change: reads stay correct throughout, no write is lost.
TEST(OverlaySnapshots, DeleteUnderConcurrentWritesKeepsEveryReadCorrect) {
  Rig rig;
  constexpr uint64_t g = 4096;
  auto& o = rig.open(g);
  auto model = rig.mem().contents(0, kSize);
  // Three levels, each writing a third of the blocks with its own byte.
  for (int level = 0; level < 3; ++level) {
    for (uint64_t b = static_cast<uint64_t>(level); b < kSize / g; b += 3) {
      const auto v = static_cast<uint8_t>(0x40 + level);
      ASSERT_FALSE(rig.run(o.write(bytes(g, v), b * g, 0)));
      std::fill_n(model.begin() + static_cast<ptrdiff_t>(b * g), g, std::byte{v});
    }
    ASSERT_TRUE(rig.run(o.snapshot("l" + std::to_string(level))).ok());
  }
  // Writers own the first half (partial writes: copy-ups race the merge);
  // readers check the second half, which no one writes.
  std::atomic<bool> stop{false};
  std::atomic<int> bad_reads{0};
  std::vector<std::thread> threads;
  std::vector<std::vector<std::pair<uint64_t, uint8_t>>> written(2);
  for (int w = 0; w < 2; ++w)
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(static_cast<uint64_t>(w) + 7);
      while (!stop.load()) {
        const uint64_t off = (rng() % (kSize / 2 / 512)) * 512;
        if (off % 1024 != static_cast<uint64_t>(w) * 512) continue;  // disjoint 512-byte slots
        const auto v = static_cast<uint8_t>(rng() | 1);
        ASSERT_FALSE(rig.run(o.write(bytes(512, v), off, 0)));
        written[static_cast<size_t>(w)].emplace_back(off, v);
      }
    });
  threads.emplace_back([&] {
    while (!stop.load()) {
      const auto got = rig.read(kSize / 2, kSize / 2);
      if (!std::equal(got.begin(), got.end(), model.begin() + kSize / 2)) bad_reads.fetch_add(1);
    }
  });
  ASSERT_TRUE(rig.run(o.delete_snapshot("l1")).ok());  // middle: into l2
  ASSERT_TRUE(rig.run(o.delete_snapshot("l2")).ok());  // newest: into the top
  ASSERT_TRUE(rig.run(o.snapshot("mid")).ok());        // and a snapshot under load
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad_reads.load(), 0);
  for (const auto& list : written)
    for (const auto& [off, v] : list) std::fill_n(model.begin() + static_cast<ptrdiff_t>(off), 512, std::byte{v});
  expect_content(rig, model, "delete under load");
  ASSERT_EQ(names(rig.layer()), (std::vector<std::string>{"l0", "mid"}));
  ASSERT_FALSE(rig.run(o.flush()));
  rig.close();
  rig.open(g);
  expect_content(rig, model, "reopen after delete under load");
}

}  // namespace
}  // namespace blockway::cache
