// FileDevice on a temporary sparse file: data path, holes, read-only, errors.
#include "core/checked_device.hpp"
#include "remote/file/file_device.hpp"
#include "tests/support/test_util.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio/thread_pool.hpp>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <system_error>
#include <vector>

namespace blockway::remote::file {
namespace {

using core::ByteRange;
using core::ExtentList;
using core::kExtentHole;
using core::kExtentZero;
using core::kFua;
using core::kNoHole;
using test::sync_wait;
using ::testing::HasSubstr;

constexpr uint64_t kSize = 1u << 20;
constexpr uint32_t kHoleZero = kExtentHole | kExtentZero;

std::error_code err(int e) { return core::errno_code(e); }

std::vector<std::byte> pattern(size_t n, uint8_t seed) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>((i * 13 + seed) % 255 + 1));
  return v;
}

class FileDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/blockway-file-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/disk.img";
    const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, kSize), 0);  // one big hole
    ::close(fd);
  }
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  // Raw access to the image, bypassing the device.
  void raw_write(uint64_t offset, const std::vector<std::byte>& data) {
    const int fd = ::open(path_.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset)),
              static_cast<ssize_t>(data.size()));
    ::close(fd);
  }
  std::vector<std::byte> raw_read(uint64_t offset, size_t n) {
    std::vector<std::byte> out(n);
    const int fd = ::open(path_.c_str(), O_RDONLY);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::pread(fd, out.data(), n, static_cast<off_t>(offset)), static_cast<ssize_t>(n));
    ::close(fd);
    return out;
  }
  uint64_t allocated_bytes() {
    struct stat st {};
    EXPECT_EQ(::stat(path_.c_str(), &st), 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }
  ExtentList status(core::BlockDevice& dev, ByteRange r) {
    ExtentList out;
    EXPECT_EQ(sync_wait(dev.block_status(r, out)), std::error_code{});
    return out;
  }
  std::vector<std::byte> read(core::BlockDevice& dev, uint64_t offset, size_t n) {
    std::vector<std::byte> out(n, std::byte{0x55});
    EXPECT_EQ(sync_wait(dev.read(out, offset, 0)), std::error_code{});
    return out;
  }
  static bool all_zero(const std::vector<std::byte>& v) {
    return std::all_of(v.begin(), v.end(), [](std::byte b) { return b == std::byte{0}; });
  }

  boost::asio::thread_pool pool_{2};
  std::string dir_;
  std::string path_;
};

TEST_F(FileDeviceTest, GeometryCapabilitiesAndDescription) {
  FileDevice dev(path_, false, pool_);
  EXPECT_EQ(dev.geometry().size, kSize);
  EXPECT_EQ(dev.describe(), "file:" + path_);
  const auto c = dev.capabilities();
  EXPECT_FALSE(c.read_only);
  EXPECT_EQ(c.flush, core::Support::native);
  EXPECT_EQ(c.fua, core::Support::native);
  EXPECT_EQ(c.trim, core::Support::native);
  EXPECT_EQ(c.zero, core::Support::native);
  EXPECT_EQ(c.extents, core::Support::native);
}

TEST_F(FileDeviceTest, WriteReadRoundTripReachesTheFile) {
  FileDevice dev(path_, false, pool_);
  const auto data = pattern(12345, 1);
  EXPECT_EQ(sync_wait(dev.write(data, 4097, 0)), std::error_code{});
  EXPECT_EQ(read(dev, 4097, data.size()), data);
  EXPECT_EQ(raw_read(4097, data.size()), data);
  // Bytes around the write are untouched zeroes.
  EXPECT_TRUE(all_zero(read(dev, 0, 4097)));
}

TEST_F(FileDeviceTest, ReadsDataWrittenByOthersEvenWhenNotCached) {
  const auto data = pattern(65536, 2);
  raw_write(131072, data);
  {
    const int fd = ::open(path_.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);  // best effort: force the slow path
    ::close(fd);
  }
  FileDevice dev(path_, true, pool_);
  EXPECT_EQ(read(dev, 131072, data.size()), data);
}

TEST_F(FileDeviceTest, ReadPastEndOfFileIsEio) {
  FileDevice dev(path_, false, pool_);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(sync_wait(dev.read(buf, kSize - 1024, 0)), err(EIO));
}

TEST_F(FileDeviceTest, FuaWriteAndFlush) {
  FileDevice dev(path_, false, pool_);
  const auto data = pattern(8192, 3);
  EXPECT_EQ(sync_wait(dev.write(data, 65536, kFua)), std::error_code{});
  EXPECT_EQ(raw_read(65536, data.size()), data);
  EXPECT_EQ(sync_wait(dev.flush()), std::error_code{});
  EXPECT_EQ(sync_wait(dev.prefetch({0, 65536})), std::error_code{});
}

TEST_F(FileDeviceTest, TrimPunchesAHole) {
  FileDevice dev(path_, false, pool_);
  ASSERT_EQ(sync_wait(dev.write(pattern(65536, 4), 0, 0)), std::error_code{});
  ASSERT_EQ(sync_wait(dev.flush()), std::error_code{});
  const uint64_t before = allocated_bytes();
  EXPECT_EQ(status(dev, {0, 65536}), (ExtentList{{65536, 0}}));

  EXPECT_EQ(sync_wait(dev.trim({16384, 16384}, 0)), std::error_code{});
  EXPECT_EQ(status(dev, {0, 65536}), (ExtentList{{16384, 0}, {16384, kHoleZero}, {32768, 0}}));
  EXPECT_TRUE(all_zero(read(dev, 16384, 16384)));
  const auto written = pattern(65536, 4);
  EXPECT_EQ(read(dev, 0, 16384), std::vector<std::byte>(written.begin(), written.begin() + 16384));
  EXPECT_EQ(read(dev, 32768, 32768), std::vector<std::byte>(written.begin() + 32768, written.end()));
  EXPECT_LT(allocated_bytes(), before);
  EXPECT_EQ(dev.geometry().size, kSize);  // KEEP_SIZE
  struct stat st {};
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kSize);
}

TEST_F(FileDeviceTest, ZeroWithoutNoHolePunches) {
  FileDevice dev(path_, false, pool_);
  ASSERT_EQ(sync_wait(dev.write(pattern(65536, 5), 0, 0)), std::error_code{});
  EXPECT_EQ(sync_wait(dev.zero({0, 32768}, kFua)), std::error_code{});
  EXPECT_TRUE(all_zero(read(dev, 0, 32768)));
  EXPECT_EQ(status(dev, {0, 65536}), (ExtentList{{32768, kHoleZero}, {32768, 0}}));
}

TEST_F(FileDeviceTest, ZeroWithNoHoleKeepsTheBlocksAllocated) {
  FileDevice dev(path_, false, pool_);
  ASSERT_EQ(sync_wait(dev.write(pattern(65536, 6), 0, 0)), std::error_code{});
  ASSERT_EQ(sync_wait(dev.flush()), std::error_code{});
  const uint64_t before = allocated_bytes();
  const auto ec = sync_wait(dev.zero({0, 32768}, kNoHole));
  if (ec == err(ENOTSUP)) GTEST_SKIP() << "this file system has no FALLOC_FL_ZERO_RANGE";
  ASSERT_EQ(ec, std::error_code{});
  EXPECT_TRUE(all_zero(read(dev, 0, 32768)));
  const auto written = pattern(65536, 6);
  EXPECT_EQ(raw_read(32768, 32768), std::vector<std::byte>(written.begin() + 32768, written.end()));
  EXPECT_GE(allocated_bytes(), before);
}

TEST_F(FileDeviceTest, ZeroThroughCheckedDeviceAlwaysReadsBackAsZero) {
  core::CheckedDevice dev(std::make_unique<FileDevice>(path_, false, pool_), false);
  ASSERT_EQ(sync_wait(dev.write(pattern(65536, 7), 0, 0)), std::error_code{});
  EXPECT_EQ(sync_wait(dev.zero({4096, 8192}, kNoHole)), std::error_code{});
  EXPECT_EQ(sync_wait(dev.zero({20480, 8192}, 0)), std::error_code{});
  const auto back = read(dev, 0, 65536);
  auto expected = pattern(65536, 7);
  std::fill(expected.begin() + 4096, expected.begin() + 12288, std::byte{0});
  std::fill(expected.begin() + 20480, expected.begin() + 28672, std::byte{0});
  EXPECT_EQ(back, expected);
}

TEST_F(FileDeviceTest, BlockStatusOfMixedDataAndHoles) {
  raw_write(0, pattern(4096, 8));
  raw_write(kSize - 4096, pattern(4096, 9));
  FileDevice dev(path_, false, pool_);
  EXPECT_EQ(status(dev, {0, kSize}), (ExtentList{{4096, 0}, {kSize - 8192, kHoleZero}, {4096, 0}}));
  // A range that starts and ends inside extents is clipped to the range.
  EXPECT_EQ(status(dev, {2048, 8192}), (ExtentList{{2048, 0}, {6144, kHoleZero}}));
  EXPECT_EQ(status(dev, {8192, 8192}), (ExtentList{{8192, kHoleZero}}));
}

TEST_F(FileDeviceTest, BlockStatusOfTrailingHole) {
  raw_write(0, pattern(4096, 10));
  FileDevice dev(path_, false, pool_);
  EXPECT_EQ(status(dev, {65536, 65536}), (ExtentList{{65536, kHoleZero}}));
  EXPECT_EQ(status(dev, {0, kSize}), (ExtentList{{4096, 0}, {kSize - 4096, kHoleZero}}));
}

TEST_F(FileDeviceTest, BlockStatusStopsAfter64Extents) {
  // 100 data blocks separated by holes: 200 extents in all.
  for (uint64_t i = 0; i < 100; ++i) raw_write(i * 8192, pattern(4096, 11));
  FileDevice dev(path_, false, pool_);
  const auto out = status(dev, {0, kSize});
  ASSERT_EQ(out.size(), 64u);
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(out[i].length, 4096u);
    EXPECT_EQ(out[i].flags, i % 2 ? kHoleZero : 0u);
  }
}

TEST_F(FileDeviceTest, ReadOnlyOpenRefusesWrites) {
  raw_write(0, pattern(4096, 12));
  auto inner = std::make_unique<FileDevice>(path_, true, pool_);
  FileDevice* file = inner.get();
  EXPECT_TRUE(file->capabilities().read_only);
  // The fd itself is read-only: even a write that skips CheckedDevice fails.
  const auto junk = pattern(4096, 13);
  EXPECT_EQ(sync_wait(file->write(junk, 0, 0)), err(EBADF));
  EXPECT_NE(sync_wait(file->trim({0, 4096}, 0)), std::error_code{});

  core::CheckedDevice dev(std::move(inner), false);
  EXPECT_TRUE(dev.capabilities().read_only);
  EXPECT_EQ(sync_wait(dev.write(junk, 0, 0)), err(EPERM));
  EXPECT_EQ(sync_wait(dev.zero({0, 4096}, 0)), err(EPERM));
  EXPECT_EQ(sync_wait(dev.trim({0, 4096}, 0)), err(EPERM));
  EXPECT_EQ(raw_read(0, 4096), pattern(4096, 12));
  EXPECT_EQ(read(dev, 0, 4096), pattern(4096, 12));
}

TEST_F(FileDeviceTest, UnwritableFileFallsBackToReadOnly) {
  if (::geteuid() == 0) GTEST_SKIP() << "root can write a mode 0444 file";
  ASSERT_EQ(::chmod(path_.c_str(), 0444), 0);
  FileDevice dev(path_, false, pool_);
  EXPECT_TRUE(dev.capabilities().read_only);
}

TEST_F(FileDeviceTest, CurrentSizeFollowsAGrowthButNotAShrink) {
  FileDevice dev(path_, false, pool_);
  EXPECT_EQ(dev.current_size(), kSize);
  ASSERT_EQ(::truncate(path_.c_str(), 3 * kSize), 0);
  EXPECT_EQ(dev.geometry().size, kSize) << "nothing tells the device until it looks";
  EXPECT_EQ(dev.current_size(), 3 * kSize);
  EXPECT_EQ(dev.geometry().size, 3 * kSize);
  // The new space reads as zeroes and takes writes.
  EXPECT_TRUE(all_zero(read(dev, 2 * kSize, 4096)));
  const auto data = pattern(4096, 9);
  EXPECT_EQ(sync_wait(dev.write(data, 3 * kSize - 4096, 0)), std::error_code{});
  EXPECT_EQ(raw_read(3 * kSize - 4096, 4096), data);
  // A shrink is reported but not taken.
  ASSERT_EQ(::truncate(path_.c_str(), 2 * kSize), 0);
  EXPECT_EQ(dev.current_size(), 2 * kSize);
  EXPECT_EQ(dev.geometry().size, 3 * kSize);
}

TEST_F(FileDeviceTest, MissingFileThrowsWithThePath) {
  const std::string missing = dir_ + "/no-such.img";
  try {
    FileDevice dev(missing, false, pool_);
    FAIL() << "opening a missing file succeeded";
  } catch (const std::system_error& e) {
    EXPECT_THAT(e.what(), HasSubstr(missing));
    EXPECT_EQ(e.code().value(), ENOENT);
  }
}

TEST_F(FileDeviceTest, DirectoryIsRefused) {
  for (bool ro : {false, true}) {
    try {
      FileDevice dev(dir_, ro, pool_);
      FAIL() << "a directory was accepted (read_only=" << ro << ")";
    } catch (const std::system_error& e) {
      EXPECT_THAT(e.what(), HasSubstr(dir_));
    }
  }
}

TEST_F(FileDeviceTest, CheckedFileDeviceAdvertisesNativeFeatures) {
  core::CheckedDevice dev(std::make_unique<FileDevice>(path_, false, pool_), false);
  const auto c = dev.capabilities();
  EXPECT_FALSE(c.read_only);
  EXPECT_EQ(c.fua, core::Support::native);
  EXPECT_EQ(c.extents, core::Support::native);
  EXPECT_TRUE(c.multi_conn);
  // Range checks use the file size.
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(sync_wait(dev.read(buf, kSize - 2048, 0)), err(EINVAL));
  EXPECT_EQ(sync_wait(dev.write(buf, kSize - 2048, 0)), err(ENOSPC));
}

}  // namespace
}  // namespace blockway::remote::file
