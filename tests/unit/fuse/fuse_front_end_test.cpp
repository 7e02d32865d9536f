// FuseFrontEnd follows the export table: exports added and removed at run
// time appear in the mount and disappear (the kernel is told), and an open
// file outlives its export's removal.
#include "fuse/fuse_front_end.hpp"

#include "tests/unit/fuse/fuse_mount_fixture.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace blockway::fuse {
namespace {

using test::MemoryDevice;
using test_support::FuseMount;
using test_support::listing;
using test_support::memory_export;
using namespace std::chrono_literals;

TEST_F(FuseMount, ExportsAddedAndRemovedAtRunTimeAppearAndDisappear) {
  MemoryDevice* a = nullptr;
  table_.add(memory_export("a", 1 << 20, &a));
  start();
  EXPECT_EQ(front_->mountpoint(), mnt_);
  EXPECT_EQ(listing(mnt_), (std::set<std::string>{"a"}));

  MemoryDevice* b = nullptr;
  table_.add(memory_export("b", 2 << 20, &b));
  table_.add(memory_export("bad/name", 4096, nullptr));  // cannot be a file name: not shown
  EXPECT_TRUE(test::eventually([&] { return listing(mnt_) == std::set<std::string>{"a", "b"}; }, 5s));
  struct stat st{};
  ASSERT_EQ(::stat((mnt_ + "/b").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 2 << 20);

  // An open file outlives its export's removal from the table.
  b->fill_pattern(0, 4096);
  const int fd = ::open((mnt_ + "/b").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  table_.remove("b");
  EXPECT_TRUE(test::eventually([&] { return listing(mnt_) == std::set<std::string>{"a"}; }, 5s));
  EXPECT_TRUE(test::eventually([&] { return ::access((mnt_ + "/b").c_str(), F_OK) != 0; }, 5s));
  char c = 0;
  EXPECT_EQ(::pread(fd, &c, 1, 7), 1);
  EXPECT_EQ(std::byte(static_cast<uint8_t>(c)), MemoryDevice::pattern_at(7));
  ::close(fd);

  // The name comes back as a new export.
  table_.add(memory_export("b", 4096, nullptr));
  EXPECT_TRUE(test::eventually([&] {
    struct stat s{};
    return ::stat((mnt_ + "/b").c_str(), &s) == 0 && s.st_size == 4096;
  }, 5s));
}

}  // namespace
}  // namespace blockway::fuse
