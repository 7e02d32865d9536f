// The operations through a real mount (root and /dev/fuse needed, else
// skipped) over MemoryDevice exports: device errors reach the file's user as
// the right errno; an open that runs out of memory leaks nothing; on a
// device that takes only whole 4096-byte blocks, reads, writes, fallocate
// and lseek at any byte work byte-exact through the file's BlockSizeLayer,
// including the partial final block, and writes in flight at once (async
// direct I/O) are ordered by it: concurrent RMWs of one block, an aligned
// write against an RMW of its block, and the other way round.
#include "fuse/operations.hpp"

#include "tests/unit/fuse/fuse_mount_fixture.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>

namespace blockway::fuse {
namespace {

using test::MemoryDevice;
using test::Op;
using test_support::AioWriter;
using test_support::FuseMount;
using test_support::memory_export;
using namespace std::chrono_literals;

TEST_F(FuseMount, DeviceErrorsReachTheFileUserAsErrno) {
  ASSERT_NO_FATAL_FAILURE(open_a(1 << 20, 1, FuseOptions{.direct_io = true, .readers = 2}, O_RDWR));
  MemoryDevice* a = dev_;
  const int fd = fd_;
  char buf[4096] = {};
  a->fail(Op::read, ETIMEDOUT);
  EXPECT_EQ(::pread(fd, buf, sizeof buf, 0), -1);
  EXPECT_EQ(errno, EIO);
  a->fail(Op::read, 0);
  a->fail(Op::write, ENOSPC);
  EXPECT_EQ(::pwrite(fd, buf, sizeof buf, 0), -1);
  EXPECT_EQ(errno, ENOSPC);
  a->fail(Op::write, 0);
  EXPECT_EQ(::pwrite(fd, buf, sizeof buf, 0), static_cast<ssize_t>(sizeof buf));
  a->fail(Op::flush, EIO);
  EXPECT_EQ(::fsync(fd), -1);
  EXPECT_EQ(errno, EIO);
  a->fail(Op::flush, 0);
  const auto flushes = a->calls(Op::flush);
  EXPECT_EQ(::fdatasync(fd), 0);
  EXPECT_EQ(a->calls(Op::flush), flushes + 1);
  // close() flushes only after writes: none since the fdatasync.
  EXPECT_EQ(::close(fd), 0);
  EXPECT_EQ(a->calls(Op::flush), flushes + 1);
}

// An open whose handle cannot be entered in the table of open files (no
// memory) fails with ENOMEM and leaves no handle behind: the export is let
// go once it is removed.
TEST_F(FuseMount, AnOpenOutOfMemoryLeaksNoHandle) {
  auto exp = memory_export("a", 4096, nullptr);
  table_.add(exp);
  start();
  const std::string path = mnt_ + "/a";
  int fd = ::open(path.c_str(), O_RDONLY);  // the name is looked up and cached now
  ASSERT_GE(fd, 0);
  ::close(fd);
  ASSERT_TRUE(test::eventually([&] { return exp.use_count() == 3; }, 5s));  // here, the table, its node
  // The table's node for one more pointer (std::unordered_set<Handle*>).
  test_support::fail_next_new_of_size = 2 * sizeof(void*);
  fd = ::open(path.c_str(), O_RDONLY);
  const int err = errno;
  test_support::fail_next_new_of_size = 0;
  EXPECT_EQ(fd, -1);
  EXPECT_EQ(err, ENOMEM);
  if (fd >= 0) ::close(fd);
  table_.remove("a");
  EXPECT_TRUE(test::eventually([&] { return exp.use_count() == 1; }, 5s))
      << "something still holds the export: " << exp.use_count();
}

// The device takes only whole 4096-byte blocks (an NBD remote advertising
// that minimum): writes, reads, fallocate and lseek at any byte still work,
// byte-exact, and the bytes around them stay.
TEST_F(FuseMount, RequestsOffTheDeviceGridAreReadModifyWritten) {
  constexpr uint64_t kSize = 1 << 20;
  ASSERT_NO_FATAL_FAILURE(open_on_4k_grid(kSize));
  MemoryDevice* const a = dev_;
  std::vector<std::byte>& expect = expect_;
  const int fd = fd_;
  auto put = [&](uint64_t off, size_t n, uint8_t seed) { ASSERT_NO_FATAL_FAILURE(this->put(off, n, seed, 7)); };
  put(10, 3, 1);             // inside one block
  put(4000, 10000, 2);       // partial, whole, partial
  put(8192 - 50, 100, 3);    // across one block boundary
  put(16384, 4096, 4);       // aligned: the fast path
  put(kSize - 5, 5, 5);      // the last bytes of the image
  put(20480, 4000, 6);       // starts on the grid, ends off it
  EXPECT_EQ(a->contents(0, kSize), expect);
  std::vector<std::byte> got(7001);
  ASSERT_EQ(::pread(fd, got.data(), got.size(), 3), static_cast<ssize_t>(got.size()));
  EXPECT_TRUE(std::equal(got.begin(), got.end(), expect.begin() + 3));
  ASSERT_EQ(::pread(fd, got.data(), 10, kSize - 10), 10);  // a short read at the end
  EXPECT_TRUE(std::equal(got.begin(), got.begin() + 10, expect.end() - 10));

  // Punch a hole and zero a range with unaligned edges.
  ASSERT_EQ(::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 9000), 0) << std::strerror(errno);
  std::fill(expect.begin() + 100, expect.begin() + 9100, std::byte{0});
  ASSERT_EQ(::fallocate(fd, FALLOC_FL_ZERO_RANGE, 30000, 50), 0) << std::strerror(errno);
  std::fill(expect.begin() + 30000, expect.begin() + 30050, std::byte{0});
  EXPECT_EQ(a->contents(0, kSize), expect);
  EXPECT_EQ(::lseek(fd, 4097, SEEK_DATA), 4097);
  EXPECT_EQ(::lseek(fd, 4097, SEEK_HOLE), static_cast<off_t>(kSize));
  // Block status off the grid is asked from the grid: the device saw only that.
  for (const auto& c : a->log_of(Op::block_status)) EXPECT_EQ(c.offset % 4096, 0u) << c.offset;
  ::close(fd);
}

// An image whose size is off the device's grid: its final, partial block is
// read and written (and read-modify-written) by requests that end at the
// image's end, byte-exact.
TEST_F(FuseMount, ThePartialFinalBlockIsReadAndWritten) {
  constexpr uint64_t kSize = 4 * 4096 + 512;
  ASSERT_NO_FATAL_FAILURE(open_on_4k_grid(kSize));
  MemoryDevice* const a = dev_;
  std::vector<std::byte>& expect = expect_;
  const int fd = fd_;
  auto put = [&](uint64_t off, size_t n, uint8_t seed) { ASSERT_NO_FATAL_FAILURE(this->put(off, n, seed, 3)); };
  put(16384 + 100, 10, 1);   // inside the partial block
  put(16000, 600, 2);        // the last whole block's end and the partial block's start
  put(16384, 512, 3);        // all of the partial block
  put(kSize - 1, 1, 4);      // the last byte
  EXPECT_EQ(a->contents(0, kSize), expect);
  std::vector<std::byte> got(kSize);
  ASSERT_EQ(::pread(fd, got.data(), 8192, 12000), static_cast<ssize_t>(kSize - 12000));  // to the end
  EXPECT_TRUE(std::equal(got.begin(), got.begin() + (kSize - 12000), expect.begin() + 12000));
  ASSERT_EQ(::pread(fd, got.data(), 5, 16384 + 3), 5);
  EXPECT_TRUE(std::equal(got.begin(), got.begin() + 5, expect.begin() + 16384 + 3));
  ASSERT_EQ(::fallocate(fd, FALLOC_FL_ZERO_RANGE, 16300, kSize - 16300), 0) << std::strerror(errno);
  std::fill(expect.begin() + 16300, expect.end(), std::byte{0});
  const auto after = a->contents(0, kSize);
  EXPECT_EQ(after, expect);
  ::close(fd);
}

// A device that refuses the partial final block (nbdkit's blocksize-policy
// with `error`): a write into it is short up to it, a read into it EIO.
TEST_F(FuseMount, APartialFinalBlockTheDeviceRefusesEndsWritesShort) {
  constexpr uint64_t kTail = 4 * 4096;
  ASSERT_NO_FATAL_FAILURE(open_on_4k_grid(kTail + 512));
  dev_->refuse_partial_blocks(true);
  std::vector<char> data(1000, 'z');
  EXPECT_EQ(::pwrite(fd_, data.data(), data.size(), kTail - 600), 600);
  EXPECT_EQ(::pwrite(fd_, data.data(), 10, kTail + 1), -1);
  EXPECT_EQ(errno, EIO);
  EXPECT_EQ(::pread(fd_, data.data(), 10, kTail + 3), -1);
  EXPECT_EQ(errno, EIO);
  std::fill_n(expect_.begin() + (kTail - 600), 600, std::byte{'z'});
  EXPECT_EQ(dev_->contents(0, kTail + 512), expect_);
  ::close(fd_);
}

// Several unaligned writes into one block in flight at once (async direct
// I/O): each read-modify-write waits for the one before, so no write undoes
// another's bytes. The device's reads are held until all are submitted, and
// its writes until every read that could start has read.
TEST_F(FuseMount, ConcurrentUnalignedWritesIntoOneBlockKeepEachOthersBytes) {
  ASSERT_NO_FATAL_FAILURE(open_direct_on_4k_grid());
  constexpr int kWriters = 8;
  constexpr size_t kSlot = 16;
  std::vector<std::vector<char>> data(kWriters);
  dev_->close_gate(Op::read);
  dev_->close_gate(Op::write);
  AioWriter aio(fd_);
  for (int i = 0; i < kWriters; ++i) {
    data[i].assign(kSlot, static_cast<char>('A' + i));
    aio.submit(data[i].data(), kSlot, 5 + i * kSlot);  // all in block 0, none aligned
  }
  EXPECT_TRUE(test::eventually([&] { return dev_->in_flight(Op::read) >= 1; }, 5s));
  std::this_thread::sleep_for(200ms);  // every write has reached the front end by now
  dev_->open_gate(Op::read);
  std::this_thread::sleep_for(200ms);  // without the lock, every one has read the old block now
  dev_->open_gate(Op::write);
  const auto results = aio.wait_all();
  ASSERT_EQ(results.size(), static_cast<size_t>(kWriters)) << "writes did not complete";
  for (auto r : results) EXPECT_EQ(r, static_cast<int64_t>(kSlot));
  ::close(fd_);
  const auto got = dev_->contents(0, 4096);
  for (int i = 0; i < kWriters; ++i)
    for (size_t j = 0; j < kSlot; ++j)
      EXPECT_EQ(got[5 + i * kSlot + j], std::byte(static_cast<uint8_t>('A' + i))) << "writer " << i;
  EXPECT_EQ(dev_->max_in_flight(Op::read), 1u);  // the read-modify-writes took turns
}

// An aligned write of a block while an unaligned write into it is being
// read-modify-written waits for it: it reaches the device only after the
// RMW wrote the block back, so it is not undone by it.
TEST_F(FuseMount, AnAlignedWriteWaitsForAReadModifyWriteOfItsBlock) {
  ASSERT_NO_FATAL_FAILURE(open_direct_on_4k_grid());
  AioWriter aio(fd_);
  dev_->close_gate(Op::read);
  aio.submit(patch_.data(), patch_.size(), 5);  // the RMW: holds the lock, its read waits at the gate
  ASSERT_TRUE(test::eventually([&] { return dev_->in_flight(Op::read) == 1; }, 5s));
  aio.submit(whole_.data(), whole_.size(), 0);  // aligned, the same block
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(dev_->in_flight(Op::write), 0u) << "the aligned write went ahead of the RMW";
  dev_->open_gate(Op::read);
  const auto results = aio.wait_all();
  ASSERT_EQ(results.size(), 2u);
  for (auto r : results) EXPECT_GT(r, 0);
  EXPECT_EQ(dev_->contents(0, 4096), std::vector<std::byte>(4096, std::byte{'W'}));  // the later write wins
  ::close(fd_);
}

// The other way round: an unaligned write into a block that an aligned write
// (which took no lock) is still writing waits for it before it reads the
// block, so it keeps the aligned write's bytes around its own.
TEST_F(FuseMount, AReadModifyWriteWaitsForAnAlignedWriteInFlight) {
  ASSERT_NO_FATAL_FAILURE(open_direct_on_4k_grid());
  AioWriter aio(fd_);
  dev_->close_gate(Op::write);
  aio.submit(whole_.data(), whole_.size(), 0);  // aligned: at the device, held at the gate
  ASSERT_TRUE(test::eventually([&] { return dev_->in_flight(Op::write) == 1; }, 5s));
  aio.submit(patch_.data(), patch_.size(), 5);
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(dev_->calls(Op::read), 0u) << "the RMW read the block under an aligned write in flight";
  dev_->open_gate(Op::write);
  const auto results = aio.wait_all();
  ASSERT_EQ(results.size(), 2u);
  for (auto r : results) EXPECT_GT(r, 0);
  auto expect = std::vector<std::byte>(4096, std::byte{'W'});
  std::fill(expect.begin() + 5, expect.begin() + 21, std::byte{'U'});
  EXPECT_EQ(dev_->contents(0, 4096), expect);
  ::close(fd_);
}

}  // namespace
}  // namespace blockway::fuse
