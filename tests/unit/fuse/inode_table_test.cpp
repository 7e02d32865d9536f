// InodeTable without a mount: names that can be file names, inode numbers,
// exports added and removed, a BlockSizeLayer for devices with a grid, and
// open handles (released one by one or all at once).
#include "fuse/inode_table.hpp"

#include "core/logging.hpp"
#include "tests/unit/fuse/fuse_mount_fixture.hpp"

#include <gtest/gtest.h>

namespace blockway::fuse {
namespace {

using test_support::memory_export;

TEST(FuseNames, OnlyNamesThatCanBeFileNames) {
  EXPECT_TRUE(representable_name("vm1"));
  EXPECT_TRUE(representable_name(std::string(255, 'a')));
  EXPECT_FALSE(representable_name(std::string(256, 'a')));
  EXPECT_FALSE(representable_name(""));
  EXPECT_FALSE(representable_name("."));
  EXPECT_FALSE(representable_name(".."));
  EXPECT_FALSE(representable_name("a/b"));
  EXPECT_FALSE(representable_name(std::string("a\0b", 3)));
}

TEST(InodeTable, FollowsTheExportsWithNewInodeNumbers) {
  InodeTable table(core::logger("fuse"));
  auto a = memory_export("a", 4096, nullptr);
  auto b = memory_export("b", 8192, nullptr, /*read_only=*/true);
  table.reset({a, b, memory_export("bad/name", 4096, nullptr)});  // cannot be a file name: not shown
  EXPECT_EQ(table.list(), (std::vector<std::pair<std::string, fuse_ino_t>>{{"a", 2}, {"b", 3}}));
  EXPECT_EQ(table.totals().files, 2u);
  EXPECT_EQ(table.totals().bytes, 4096u + 8192u);
  const auto nb = table.lookup("b");
  ASSERT_TRUE(nb);
  EXPECT_EQ(table.find(nb->ino), nb);
  EXPECT_TRUE(nb->read_only);
  EXPECT_EQ(nb->size(), 8192u);
  EXPECT_FALSE(table.lookup("bad/name"));

  // A second export of a name taken changes nothing; removing another export
  // of that name neither.
  EXPECT_FALSE(table.apply(memory_export("a", 4096, nullptr), core::ExportEvent::added));
  EXPECT_FALSE(table.apply(memory_export("a", 4096, nullptr), core::ExportEvent::removed));
  EXPECT_TRUE(table.apply(a, core::ExportEvent::removed));
  EXPECT_FALSE(table.lookup("a"));
  EXPECT_FALSE(table.find(2));
  // Back again: a new file, a new inode.
  EXPECT_TRUE(table.apply(a, core::ExportEvent::added));
  EXPECT_EQ(table.lookup("a")->ino, 4u);
  // A new mount numbers on: an inode number is never given twice.
  table.reset({a});
  EXPECT_EQ(table.lookup("a")->ino, 5u);
}

// Only a device with a grid gets a BlockSizeLayer; the file then takes
// requests of any alignment (the layer's own tests are in core/).
TEST(InodeTable, ADeviceWithAGridGetsABlockSizeLayer) {
  InodeTable table(core::logger("fuse"));
  table.reset({memory_export("plain", 4096, nullptr), memory_export("grid", 8192, nullptr, false, 4096)});
  const auto plain = table.lookup("plain");
  const auto grid = table.lookup("grid");
  EXPECT_FALSE(plain->blocks);
  EXPECT_TRUE(plain->on_grid(3, 5));
  EXPECT_EQ(&plain->device(), plain->exp->device.get());
  ASSERT_TRUE(grid->blocks);
  EXPECT_EQ(grid->blocks->block(), 4096u);
  EXPECT_FALSE(grid->on_grid(3, 5));
  EXPECT_TRUE(grid->on_grid(4096, 4096));
  EXPECT_EQ(&grid->device(), grid->blocks.get());
}

// A handle holds its node (and the export) after the export is gone, until
// it is released; release_all() frees the handles left when a session ends.
TEST(InodeTable, HandlesHoldTheirNodeUntilReleased) {
  InodeTable table(core::logger("fuse"));
  auto a = memory_export("a", 4096, nullptr);
  table.reset({a});
  Handle* h1 = table.open(table.lookup("a"));
  Handle* h2 = table.open(table.lookup("a"));
  EXPECT_TRUE(table.apply(a, core::ExportEvent::removed));
  EXPECT_EQ(a.use_count(), 2);  // here and the node the handles hold
  EXPECT_EQ(h1->node->name, "a");
  table.release(h1);
  EXPECT_EQ(a.use_count(), 2);
  table.release_all();
  EXPECT_EQ(a.use_count(), 1);
  (void)h2;
}

}  // namespace
}  // namespace blockway::fuse
