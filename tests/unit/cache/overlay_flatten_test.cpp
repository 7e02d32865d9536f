// OverlayLayer flatten: every block the clone reads from its base ends up in
// its overlay, client writes during the flatten win over base data, the
// base's hold is dropped, the clone reopens without its base, a stopped
// flatten resumes, and the refusals (snapshots) hold.
#include "cache/overlay_layer.hpp"

#include "tests/unit/cache/overlay_rig.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>

namespace blockway::cache {
namespace {

using core::FlattenState;

FlattenState wait_until_not_running(OverlayLayer& o, std::chrono::seconds limit = std::chrono::seconds(30)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (o.flatten_progress().state == FlattenState::running && std::chrono::steady_clock::now() < end)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  return o.flatten_progress().state;
}

void expect_content(Rig& rig, const std::vector<std::byte>& want, const std::string& when) {
  const auto got = rig.read(0, kSize);
  ASSERT_EQ(got.size(), want.size());
  for (uint64_t i = 0; i < want.size(); ++i)
    ASSERT_EQ(got[i], want[i]) << "first difference at byte " << i << " " << when;
}

TEST(OverlayFlatten, CopiesEveryBlockAndFreesTheBase) {
  Rig rig;
  auto& o = rig.open(16u << 10);
  auto want = rig.mem().contents(0, kSize);
  // Some blocks of the clone's own, one of them partial (a copy-up), and a zeroed run.
  ASSERT_FALSE(rig.run(o.write(bytes(5000, 0xab), 70000, 0)));
  std::fill_n(want.begin() + 70000, 5000, std::byte{0xab});
  ASSERT_FALSE(rig.run(o.zero({256u << 10, 64u << 10}, 0)));
  std::fill_n(want.begin() + (256 << 10), 64 << 10, std::byte{0});
  EXPECT_EQ(rig.base().read_only_holds(), 1);
  EXPECT_EQ(o.flatten_progress().state, FlattenState::none);
  EXPECT_LT(o.flatten_progress().done_bytes, kSize);

  const auto r = rig.run(o.flatten(0));
  ASSERT_TRUE(r.ok()) << r.message;
  ASSERT_EQ(wait_until_not_running(o), FlattenState::done) << o.flatten_progress().error;
  const auto p = o.flatten_progress();
  EXPECT_EQ(p.done_bytes, kSize);
  EXPECT_EQ(p.total_bytes, kSize);
  EXPECT_GT(p.copied_bytes, 0u);
  EXPECT_LT(p.copied_bytes, kSize);  // the clone's own blocks were not copied
  EXPECT_EQ(rig.base().read_only_holds(), 0);
  EXPECT_TRUE(OverlayLayer::flattened_in(rig.store(), "vm1"));
  expect_content(rig, want, "after the flatten");

  // The base is no longer read: changing it changes nothing in the clone.
  rig.mem().fill(0, kSize, std::byte{0x11});
  expect_content(rig, want, "after the base changed");
  const auto again = rig.run(o.flatten(0));
  EXPECT_TRUE(again.ok());
  EXPECT_NE(again.message.find("already flattened"), std::string::npos) << again.message;

  // Reopened without a base, as when the base export is gone.
  rig.close();
  auto& alone = rig.open(16u << 10, nullptr, true);
  EXPECT_EQ(alone.geometry().size, kSize);
  // The base's block sizes, kept in the catalogue (not the defaults).
  EXPECT_EQ(alone.geometry().min_block, 512u);
  EXPECT_EQ(alone.geometry().preferred_block, 4096u);
  EXPECT_EQ(alone.geometry().max_transfer, 32u << 20);
  EXPECT_EQ(alone.flatten_progress().state, FlattenState::done);
  expect_content(rig, want, "reopened without its base");
  ASSERT_FALSE(rig.run(alone.write(bytes(100, 0x42), 10, 0)));
  std::fill_n(want.begin() + 10, 100, std::byte{0x42});
  expect_content(rig, want, "written without its base");
  rig.close();
}

TEST(OverlayFlatten, NoBaseIsRefusedUnlessFlattened) {
  Rig rig;
  rig.open();
  rig.close();
  EXPECT_THROW(rig.open(64u << 10, nullptr, true), std::runtime_error);
}

TEST(OverlayFlatten, WritersDuringTheFlattenAreNeverOverwritten) {
  Rig rig;
  auto& o = rig.open(4u << 10);
  auto want = rig.mem().contents(0, kSize);
  // Paced so that the writers overlap it: 1 MiB at 4 MiB/s is ~250 ms.
  ASSERT_TRUE(rig.run(o.flatten(4u << 20)).ok());
  // Four writers at once, each in its own quarter (so the model is exact),
  // mostly partial blocks (copy-ups, which hold their claims longest).
  constexpr int kWriters = 4;
  std::vector<std::thread> writers;
  std::atomic<int> failures{0};
  for (int w = 0; w < kWriters; ++w)
    writers.emplace_back([&, w] {
      std::mt19937_64 rng(7 + static_cast<unsigned>(w));
      const uint64_t lo = w * (kSize / kWriters), span = kSize / kWriters;
      for (int i = 0; i < 250; ++i) {
        const uint64_t off = lo + rng() % span, len = std::min<uint64_t>(1 + rng() % 6000, lo + span - off);
        const auto v = static_cast<uint8_t>(1 + rng() % 250);
        if (rig.run(o.write(bytes(len, v), off, 0))) ++failures;
        std::fill_n(want.begin() + static_cast<ptrdiff_t>(off), len, std::byte{v});
      }
    });
  for (auto& t : writers) t.join();
  EXPECT_EQ(failures.load(), 0);
  ASSERT_EQ(wait_until_not_running(o), FlattenState::done) << o.flatten_progress().error;
  rig.mem().fill(0, kSize, std::byte{0});
  expect_content(rig, want, "after writers raced the flatten");
  rig.close();
}

// The exact race: a writer's copy-up holds block 0's claim (its base read is
// held at the gate) when the flatten reaches block 0 and waits for the
// claim; once the writer is done the flatten must skip the block, not copy
// the base over the write.
TEST(OverlayFlatten, AWriterHoldingTheClaimWinsOverTheFlatten) {
  Rig rig;
  auto& o = rig.open(64u << 10);
  auto want = rig.mem().contents(0, kSize);
  rig.mem().close_gate(test::Op::read);
  const auto data = bytes(1000, 0x5a);  // outlives the spawned write
  auto write = rig.spawn(o.write(data, 100, 0));  // partial: a copy-up
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_TRUE(rig.run(o.flatten(0)).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the flatten waits for block 0's claim
  rig.mem().open_gate(test::Op::read);
  ASSERT_FALSE(write.get());
  std::fill_n(want.begin() + 100, 1000, std::byte{0x5a});
  ASSERT_EQ(wait_until_not_running(o), FlattenState::done) << o.flatten_progress().error;
  EXPECT_EQ(o.flatten_progress().copied_bytes, kSize - (64u << 10));
  expect_content(rig, want, "after a writer held the claim");
  rig.close();
}

TEST(OverlayFlatten, SnapshotsRefuseItAndItRefusesSnapshots) {
  Rig rig;
  auto& o = rig.open();
  ASSERT_TRUE(rig.run(o.snapshot("s1")).ok());
  const auto r = rig.run(o.flatten(0));
  EXPECT_EQ(r.ec, core::errno_code(EBUSY));
  EXPECT_NE(r.message.find("'s1'"), std::string::npos) << r.message;
  ASSERT_TRUE(rig.run(o.delete_snapshot("s1")).ok());
  // 1 MiB at 64 KiB/s: about 16 s, so it is still running below.
  ASSERT_TRUE(rig.run(o.flatten(64u << 10)).ok());
  const auto s = rig.run(o.snapshot("s2"));
  EXPECT_EQ(s.ec, core::errno_code(EBUSY)) << s.message;
  const auto c = rig.run(o.cancel_flatten());
  ASSERT_TRUE(c.ok()) << c.message;
  EXPECT_EQ(o.flatten_progress().state, FlattenState::cancelled);
  EXPECT_EQ(rig.base().read_only_holds(), 1);
  EXPECT_FALSE(rig.run(o.cancel_flatten()).ok());  // nothing runs
  EXPECT_TRUE(rig.run(o.snapshot("s2")).ok());
  rig.close();
  // A cancelled flatten stays cancelled across a reopen.
  auto& again = rig.open();
  again.start();
  EXPECT_EQ(again.flatten_progress().state, FlattenState::cancelled);
  rig.close();
}

TEST(OverlayFlatten, ARunningFlattenResumesAfterReopen) {
  Rig rig;
  auto& o = rig.open(4u << 10);
  const auto want = rig.mem().contents(0, kSize);
  ASSERT_TRUE(rig.run(o.flatten(256u << 10)).ok());  // ~4 s for 1 MiB
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  rig.close();  // stops it; the catalogue still says running
  auto& again = rig.open(4u << 10);
  const auto before = again.flatten_progress();
  EXPECT_EQ(before.state, FlattenState::running);
  EXPECT_GT(before.done_bytes, 0u);  // what it copied was committed
  EXPECT_LT(before.done_bytes, kSize);
  EXPECT_EQ(before.rate, 256u << 10);
  ASSERT_TRUE(rig.run(again.flatten(0)).ok());  // faster now, it goes on
  again.start();
  ASSERT_EQ(wait_until_not_running(again), FlattenState::done) << again.flatten_progress().error;
  EXPECT_LT(again.flatten_progress().copied_bytes, kSize);
  expect_content(rig, want, "after the resumed flatten");
  rig.close();
}

}  // namespace
}  // namespace blockway::cache
