// A real FUSE mount for the fuse/ unit tests (root and /dev/fuse needed,
// else the test is skipped): a FuseFrontEnd over MemoryDevice exports,
// served by two EventLoops on a thread of the fixture; helpers to read the
// mount table and the directory, and to keep O_DIRECT writes in flight.
//
// Thread model: the test thread mounts and drives files; the loops thread
// serves them; MemoryDevice's controls are thread-safe.
#pragma once

#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "fuse/fuse_front_end.hpp"
#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>

#include <linux/aio_abi.h>

#include <atomic>
#include <cstddef>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace blockway::fuse::test_support {

// The next operator new of exactly this many bytes, on any thread, throws
// std::bad_alloc (0: off). For the whole test binary.
extern std::atomic<size_t> fail_next_new_of_size;

// An export of `size` bytes on a MemoryDevice (native flush, zero,
// extents) whose grid is min_block; *raw (if given) is the device.
std::shared_ptr<core::Export> memory_export(const std::string& name, uint64_t size, test::MemoryDevice** raw,
                                            bool read_only = false, uint32_t min_block = 1);
// Is dir a mount point of a file system of this type right now? (As the
// front end reads /proc/self/mountinfo: mount_types().)
bool mounted_as(const std::string& dir, const std::string& type);
// The names in dir.
std::set<std::string> listing(const std::string& dir);

class FuseMount : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;
  void start(FuseOptions options = {});
  // Export "a" of `size` bytes on a MemoryDevice whose grid is min_block
  // (dev_), mounted with `options` and opened with `flags` (fd_, closed by
  // the test).
  void open_a(uint64_t size, uint32_t min_block, FuseOptions options, int flags);
  // Export "a" of `size` bytes on a device that takes only whole 4096-byte
  // blocks (dev_), filled with its pattern (also in expect_), mounted with
  // direct I/O and opened (fd_, closed by the test).
  void open_on_4k_grid(uint64_t size);
  // Export "a" of 1 MiB on a device that takes only whole 4096-byte blocks
  // (dev_), mounted with direct I/O and two readers, and opened with
  // O_DIRECT (fd_, closed by the test); with a whole block and a patch of
  // it to write by async I/O (a FUSE file with direct I/O takes any
  // buffer).
  void open_direct_on_4k_grid();
  std::vector<char> whole_, patch_;
  // Writes n bytes (seed + i * step) at off through fd_, and into expect_.
  void put(uint64_t off, size_t n, uint8_t seed, uint8_t step);

  core::EventLoops loops_{2, 2};
  core::ExportTable table_;
  std::unique_ptr<FuseFrontEnd> front_;
  std::thread runner_;
  std::atomic<bool> unmounted_{false};
  std::string dir_, mnt_;
  test::MemoryDevice* dev_ = nullptr;  // the device of open_a's export
  std::vector<std::byte> expect_;
  int fd_ = -1;
};

// O_DIRECT writes by async I/O (each in flight when submit() returns).
class AioWriter {
 public:
  explicit AioWriter(int fd);
  ~AioWriter();
  void submit(const void* data, size_t n, uint64_t off);
  // Results of every write submitted, in completion order.
  std::vector<int64_t> wait_all();

 private:
  int fd_;
  aio_context_t ctx_ = 0;
  std::vector<std::unique_ptr<iocb>> cbs_;
};

}  // namespace blockway::fuse::test_support
