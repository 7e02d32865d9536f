// Unit tests for fills written with O_DIRECT (issue 17; cache/
// cache_population.cpp, CacheLayer::write_fill): a read miss whose reply
// buffer holds the whole fetched run, 4 KiB-aligned in the file and in
// memory, writes the cache file past the page cache; every other fill (an
// unaligned reply buffer, a run whose end is the image's odd tail, a run the
// reply holds in part) goes through the page cache. Checked on a real cache
// file: mincore() tells which of its pages the page cache holds, a hit
// right after a direct fill reads the filled bytes, and a crash between a
// direct fill and the catalogue's record of it refetches the chunk.
//
// Thread model: the test thread drives; requests run on the harness's loop
// thread, direct writes on its blocking pool.
#include "cache/cache_layer.hpp"

#include "core/buffer_pool.hpp"
#include "tests/unit/cache/memory_remote_fixture.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace blockway::cache {
namespace {

using test::Op;

constexpr uint64_t kChunk = 64u << 10;
constexpr uint64_t kSize = 16 * kChunk + 5000;  // the last chunk is 5000 bytes: off the 4 KiB grid

class DirectFillTest : public test::MemoryRemoteLayerTest {
 protected:
  DirectFillTest() : MemoryRemoteLayerTest(kChunk, kSize) {}

  void SetUp() override {
    test::MemoryRemoteLayerTest::SetUp();
    // The tests need a file system with O_DIRECT (ext4, xfs, btrfs; not tmpfs).
    const std::string probe = dir_.str() + "/probe";
    const int fd = ::open(probe.c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
    if (fd < 0) GTEST_SKIP() << "no O_DIRECT in " << dir_.str() << ": " << std::strerror(errno);
    ::close(fd);
    ::unlink(probe.c_str());
  }

  CacheLayer& open(uint64_t checkpoint_ms = 3600 * 1000) {
    auto cfg = config(WriteMode::writethrough);
    cfg.checkpoint_interval = std::chrono::milliseconds(checkpoint_ms);
    return open_layer(cfg, nullptr, false);
  }

  // A read into a page-aligned buffer (as the NBD server's replies are),
  // `shift` bytes into it.
  std::vector<std::byte> read_aligned(uint64_t off, uint64_t len, size_t shift = 0) {
    core::IoBuffer buf(len + shift);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(buf.data()) % 4096, 0u);
    auto part = buf.span().subspan(shift, len);
    auto ec = h_->run(layer().read(part, off, 0));
    EXPECT_FALSE(ec) << ec.message();
    return {part.begin(), part.end()};
  }

  // How many of the cache file's pages in [off, off + len) the page cache holds.
  size_t resident_pages(uint64_t off, uint64_t len) const {
    const std::string path = dir_.str() + "/cache/vm.img";
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0) << path;
    if (fd < 0) return 0;
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t start = off / page * page;
    const size_t n = (off + len - start + page - 1) / page;
    void* m = ::mmap(nullptr, n * page, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(start));
    ::close(fd);
    EXPECT_NE(m, MAP_FAILED);
    if (m == MAP_FAILED) return 0;
    std::vector<unsigned char> vec(n);
    EXPECT_EQ(::mincore(m, n * page, vec.data()), 0) << std::strerror(errno);
    ::munmap(m, n * page);
    size_t resident = 0;
    for (unsigned char v : vec) resident += v & 1;
    return resident;
  }
  static constexpr size_t kPagesPerChunk = kChunk / 4096;
};

TEST_F(DirectFillTest, AWholeRunInAnAlignedReplyIsWrittenPastThePageCache) {
  auto& l = open();
  EXPECT_EQ(read_aligned(2 * kChunk, 4 * kChunk), pattern(2 * kChunk, 4 * kChunk));
  EXPECT_EQ(resident_pages(2 * kChunk, 4 * kChunk), 0u) << "the fill went through the page cache";
  // A fill the reply holds in part (fetched into a pooled buffer) is buffered:
  // its chunk stays in the page cache, for the rest of it to be read soon.
  EXPECT_EQ(read_aligned(8 * kChunk + 4096, 8192), pattern(8 * kChunk + 4096, 8192));
  EXPECT_EQ(resident_pages(8 * kChunk, kChunk), kPagesPerChunk);
  EXPECT_EQ(l.stats().bytes_fetched, 5 * kChunk);
  // The file holds the image's bytes (read by another process's way).
  const auto file = cache_file();
  ASSERT_GE(file.size(), 9 * kChunk);
  EXPECT_TRUE(std::equal(file.begin() + 2 * kChunk, file.begin() + 6 * kChunk, pattern(2 * kChunk, 4 * kChunk).begin()));
  EXPECT_TRUE(std::equal(file.begin() + 8 * kChunk, file.begin() + 9 * kChunk, pattern(8 * kChunk, kChunk).begin()));
}

TEST_F(DirectFillTest, AHitRightAfterADirectFillReadsTheFilledBytes) {
  auto& l = open();
  EXPECT_EQ(read_aligned(0, 4 * kChunk), pattern(0, 4 * kChunk));
  const uint64_t fetches = remote_->calls(Op::read);
  // Hits at once, through the buffered descriptor: whole, inside a chunk,
  // across chunks, into aligned and unaligned buffers.
  EXPECT_EQ(read(0, 4 * kChunk), pattern(0, 4 * kChunk));
  EXPECT_EQ(read(kChunk + 123, 5000), pattern(kChunk + 123, 5000));
  EXPECT_EQ(read_aligned(kChunk - 4096, 2 * 4096), pattern(kChunk - 4096, 2 * 4096));
  EXPECT_EQ(remote_->calls(Op::read), fetches) << "a hit went to the remote";
  EXPECT_EQ(l.stats().hits, 3u);
  // A writethrough write into a direct-filled chunk (buffered), then a hit
  // over both: the page cache and the disk agree.
  ASSERT_FALSE(write(2 * kChunk + 100, test::bytes(300, 0x5a)));
  auto want = pattern(0, 4 * kChunk);
  std::fill(want.begin() + 2 * kChunk + 100, want.begin() + 2 * kChunk + 400, std::byte{0x5a});
  EXPECT_EQ(read_aligned(0, 4 * kChunk), want);
  EXPECT_EQ(remote_->contents(2 * kChunk + 100, 300), test::bytes(300, 0x5a));
}

TEST_F(DirectFillTest, RunsOffTheAlignmentAreBufferedAndRight) {
  auto& l = open();
  // The reply buffer 512 bytes off a page: buffered.
  EXPECT_EQ(read_aligned(4 * kChunk, 2 * kChunk, 512), pattern(4 * kChunk, 2 * kChunk));
  EXPECT_EQ(resident_pages(4 * kChunk, 2 * kChunk), 2 * kPagesPerChunk);
  // The image's last chunk (5000 bytes: the run's length is off the 4 KiB
  // grid) with the one before it: buffered.
  EXPECT_EQ(read_aligned(15 * kChunk, kChunk + 5000), pattern(15 * kChunk, kChunk + 5000));
  EXPECT_EQ(resident_pages(15 * kChunk, kChunk + 5000), kPagesPerChunk + 2);
  // Reads that start or end inside a chunk fetch whole chunks into a pooled
  // buffer: buffered too.
  EXPECT_EQ(read_aligned(10 * kChunk + 512, kChunk), pattern(10 * kChunk + 512, kChunk));
  EXPECT_EQ(resident_pages(10 * kChunk, 2 * kChunk), 2 * kPagesPerChunk);
  // None of them turned direct fills off: an aligned whole run is still direct.
  EXPECT_EQ(read_aligned(12 * kChunk, 2 * kChunk), pattern(12 * kChunk, 2 * kChunk));
  EXPECT_EQ(resident_pages(12 * kChunk, 2 * kChunk), 0u);
  EXPECT_EQ(l.stats().failed_requests, 0u);
  EXPECT_EQ(read(0, kSize).size(), kSize);
  EXPECT_EQ(read(0, kSize), pattern(0, kSize));
}

// DESIGN.md's invariant 3: a chunk is persisted present only after the
// fdatasync that follows its fill. A crash after a direct fill but before any
// checkpoint recorded it: the chunk is absent after the restart and fetched
// again (the remote's bytes changed meanwhile: the new ones are served).
// After a clean stop the direct-written bytes are served from the file.
TEST_F(DirectFillTest, ACrashBeforeTheCatalogueRecordsADirectFillRefetchesIt) {
  open();
  EXPECT_EQ(read_aligned(0, 2 * kChunk), pattern(0, 2 * kChunk));
  EXPECT_EQ(resident_pages(0, 2 * kChunk), 0u);
  h_->crash();
  remote_->fill(0, 2 * kChunk, std::byte{0x33});
  auto& l = open();
  EXPECT_EQ(l.stats().present_bytes, 0u);
  remote_->clear_log();
  EXPECT_EQ(read_aligned(0, 2 * kChunk), test::bytes(2 * kChunk, 0x33));
  EXPECT_EQ(remote_->log_of(Op::read).size(), 1u);

  // Recorded by the clean stop's checkpoint: served from the cache file,
  // written there directly, with the remote changed behind the cache's back.
  h_->close();
  remote_->fill(0, 2 * kChunk, std::byte{0x44});
  auto& again = open();
  EXPECT_EQ(again.stats().present_bytes, 2 * kChunk);
  remote_->clear_log();
  EXPECT_EQ(read_aligned(0, 2 * kChunk), test::bytes(2 * kChunk, 0x33));
  EXPECT_EQ(remote_->log_of(Op::read).size(), 0u);
}

}  // namespace
}  // namespace blockway::cache
