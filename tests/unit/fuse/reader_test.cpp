// Reader, through a real mount: a reader that gets no memory for its next
// receive buffer (a write took the last one) waits and tries again instead
// of ending its loop, and a write's payload is used in place.
#include "fuse/reader.hpp"

#include "tests/unit/fuse/fuse_mount_fixture.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <future>

namespace blockway::fuse {
namespace {

using test_support::FuseMount;
using namespace std::chrono_literals;

TEST_F(FuseMount, AReaderOutOfMemoryForItsBufferWaitsAndReadsOn) {
  ASSERT_NO_FATAL_FAILURE(open_a(1 << 20, 1, FuseOptions{.direct_io = true, .readers = 1}, O_RDWR));
  std::vector<char> buf(65536, 'x');
  fail_receive_buffers_for_test(3);
  ASSERT_EQ(::pwrite(fd_, buf.data(), buf.size(), 0), static_cast<ssize_t>(buf.size()));  // takes the buffer
  const auto t0 = std::chrono::steady_clock::now();
  auto reading = std::async(std::launch::async, [&] { return ::pread(fd_, buf.data(), buf.size(), 4096); });
  ASSERT_EQ(reading.wait_for(10s), std::future_status::ready) << "the reader never read again";
  EXPECT_EQ(reading.get(), static_cast<ssize_t>(buf.size()));
  // Three failed allocations, 50 ms apart, came before this read was read.
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 90ms);
  fail_receive_buffers_for_test(0);
  ::close(fd_);
  EXPECT_EQ(dev_->contents(0, 1), std::vector<std::byte>{std::byte{'x'}});
}

}  // namespace
}  // namespace blockway::fuse
