// FuseFrontEnd: options, errno mapping, and a real mount (root and /dev/fuse
// needed, else skipped) served by EventLoops over MemoryDevice exports:
// exports added and removed at run time appear and disappear, device errors
// reach the file's user as the right errno, unmount ends cleanly; requests
// off a 4096-byte device grid are read-modify-written (concurrent ones into
// one block keep each other's bytes); a hung mount at the directory does not
// block the front end's mutex; ending a detached session unmounts nothing
// that was mounted at the directory since.
#include "fuse/fuse_front_end.hpp"

#include "core/options.hpp"
#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <new>

#include <fcntl.h>
#include <linux/aio_abi.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <future>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

// GCC sees free() of what operator new returned once both are inlined; here
// they are the same allocator.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

namespace {
// Allocation-failure injection for the whole binary: the next operator new
// of exactly this many bytes, on any thread, throws std::bad_alloc (0: off).
std::atomic<size_t> g_fail_next_new_of_size{0};
}  // namespace

void* operator new(size_t n) {
  size_t armed = g_fail_next_new_of_size.load(std::memory_order_relaxed);
  if (armed != 0 && armed == n && g_fail_next_new_of_size.compare_exchange_strong(armed, 0))
    throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace blockway::fuse {
namespace {

using core::ConfigError;
using test::MemoryDevice;
using test::Op;
using namespace std::chrono_literals;

TEST(FuseOptions, ParsesEveryOption) {
  const auto o = FuseOptions::parse(
      {{"mode", "0600"}, {"uid", "12"}, {"gid", "34"}, {"allow-other", "on"}, {"direct-io", "yes"}, {"readers", "2"}});
  EXPECT_EQ(o.readers, 2u);
  EXPECT_EQ(o.mode, 0600u);
  EXPECT_EQ(o.uid, 12u);
  EXPECT_EQ(o.gid, 34u);
  EXPECT_TRUE(o.allow_other);
  EXPECT_TRUE(o.direct_io);
  const auto d = FuseOptions::parse({});
  EXPECT_EQ(d.mode, 0644u);
  EXPECT_EQ(d.uid, ::geteuid());
  EXPECT_FALSE(d.allow_other);
  EXPECT_FALSE(d.direct_io);
}

TEST(FuseOptions, RefusesBadValues) {
  EXPECT_THROW(FuseOptions::parse({{"mode", "0999"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"mode", "70000"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"uid", "-1"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"uid", "abc"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"allow-other", "perhaps"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"colour", "red"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"readers", "0"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"mount-timeout", "0"}}), ConfigError);
  EXPECT_THROW(FuseOptions::parse({{"mount-timeout", "0.5"}}), ConfigError);
  // Seconds take decimals, as every seconds option does.
  EXPECT_EQ(FuseOptions::parse({{"mount-timeout", "1.5"}}).mount_timeout, 1500ms);
  EXPECT_EQ(FuseOptions::parse({{"mount-timeout", "3"}}).mount_timeout, 3s);
  EXPECT_EQ(FuseOptions::parse({}).mount_timeout, 10s);
}

TEST(FuseErrno, PassesWhatUsersCanActOnAndMapsTheRestToEio) {
  EXPECT_EQ(fuse_errno({}), 0);
  for (int e : {EIO, ENOSPC, EROFS, EINVAL, EFBIG}) EXPECT_EQ(fuse_errno(core::errno_code(e)), e);
  for (int e : {ETIMEDOUT, ECONNRESET, ENOTCONN, EPROTO, ESHUTDOWN})
    EXPECT_EQ(fuse_errno(core::errno_code(e)), EIO);
}

TEST(FuseNames, OnlyNamesThatCanBeFileNames) {
  EXPECT_TRUE(representable_name("vm1"));
  EXPECT_TRUE(representable_name(std::string(255, 'a')));
  EXPECT_FALSE(representable_name(std::string(256, 'a')));
  EXPECT_FALSE(representable_name(""));
  EXPECT_FALSE(representable_name("."));
  EXPECT_FALSE(representable_name(".."));
  EXPECT_FALSE(representable_name("a/b"));
}

std::shared_ptr<core::Export> memory_export(const std::string& name, uint64_t size, MemoryDevice** raw,
                                               bool read_only = false, uint32_t min_block = 1) {
  core::Capabilities caps;
  caps.flush = core::Support::native;
  caps.zero = core::Support::native;
  caps.extents = core::Support::native;
  auto dev = std::make_unique<MemoryDevice>(core::Geometry{.size = size, .min_block = min_block}, caps);
  if (raw) *raw = dev.get();
  auto exp = std::make_shared<core::Export>();
  exp->name = name;
  exp->uri = "memory:";
  exp->device = std::make_shared<core::CheckedDevice>(std::move(dev), read_only);
  return exp;
}

// Is dir a mount point of a file system of this type right now?
bool mounted_as(const std::string& dir, const std::string& type) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string id, parent, devno, root, mnt;
    fields >> id >> parent >> devno >> root >> mnt;
    const auto sep = line.find(" - ");
    if (mnt == dir && sep != std::string::npos && line.compare(sep + 3, type.size() + 1, type + " ") == 0)
      return true;
  }
  return false;
}

std::set<std::string> listing(const std::string& dir) {
  std::set<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) out.insert(e.path().filename().string());
  return out;
}

class FuseMount : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0 || ::access("/dev/fuse", R_OK | W_OK) != 0) GTEST_SKIP() << "needs root and /dev/fuse";
    char tmpl[] = "/tmp/bw-fuse-unit-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    mnt_ = dir_ + "/mnt";
  }
  void TearDown() override {
    if (front_) {
      front_->unmount();
      EXPECT_TRUE(test::eventually([&] { return unmounted_.load(); }, 10s));
    }
    loops_.release();
    if (runner_.joinable()) runner_.join();
    front_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  void start(FuseOptions options = {}) {
    front_ = std::make_unique<FuseFrontEnd>(loops_, table_, options);
    front_->set_on_unmounted([&] { unmounted_ = true; });
    front_->mount(mnt_);
    runner_ = std::thread([&] { loops_.run(); });
  }
  // Export "a" of `size` bytes on a device that takes only whole 4096-byte
  // blocks, filled with its pattern (also in expect_), mounted with direct
  // I/O and opened (fd_, closed by the test).
  void open_on_4k_grid(uint64_t size) {
    table_.add(memory_export("a", size, &grid_, false, 4096));
    grid_->fill_pattern(0, size);
    expect_ = grid_->contents(0, size);
    start(FuseOptions{.direct_io = true});
    fd_ = ::open((mnt_ + "/a").c_str(), O_RDWR);
    ASSERT_GE(fd_, 0);
  }
  // Writes n bytes (seed + i * step) at off through fd_, and into expect_.
  void put(uint64_t off, size_t n, uint8_t seed, uint8_t step) {
    std::vector<std::byte> data(n);
    for (size_t i = 0; i < n; ++i) data[i] = std::byte(static_cast<uint8_t>(seed + i * step));
    ASSERT_EQ(::pwrite(fd_, data.data(), n, static_cast<off_t>(off)), static_cast<ssize_t>(n)) << off << "+" << n;
    std::copy(data.begin(), data.end(), expect_.begin() + static_cast<ptrdiff_t>(off));
  }

  core::EventLoops loops_{2, 2};
  core::ExportTable table_;
  std::unique_ptr<FuseFrontEnd> front_;
  std::thread runner_;
  std::atomic<bool> unmounted_{false};
  std::string dir_, mnt_;
  MemoryDevice* grid_ = nullptr;  // open_on_4k_grid's device
  std::vector<std::byte> expect_;
  int fd_ = -1;
};

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

TEST_F(FuseMount, DeviceErrorsReachTheFileUserAsErrno) {
  MemoryDevice* a = nullptr;
  table_.add(memory_export("a", 1 << 20, &a));
  start(FuseOptions{.direct_io = true, .readers = 2});
  const int fd = ::open((mnt_ + "/a").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
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

TEST_F(FuseMount, UnmountEndsTheMountAndCanMountAgain) {
  table_.add(memory_export("a", 4096, nullptr));
  start();
  front_->unmount();
  ASSERT_TRUE(test::eventually([&] { return unmounted_.load(); }, 10s));
  EXPECT_FALSE(front_->active());
  EXPECT_EQ(listing(mnt_), std::set<std::string>{});
  unmounted_ = false;
  front_->mount(mnt_);
  EXPECT_EQ(listing(mnt_), (std::set<std::string>{"a"}));
  EXPECT_THROW(front_->mount(mnt_), std::runtime_error);  // already mounted
}


// The device takes only whole 4096-byte blocks (an NBD remote advertising
// that minimum): writes, reads, fallocate and lseek at any byte still work,
// byte-exact, and the bytes around them stay.
TEST_F(FuseMount, RequestsOffTheDeviceGridAreReadModifyWritten) {
  constexpr uint64_t kSize = 1 << 20;
  ASSERT_NO_FATAL_FAILURE(open_on_4k_grid(kSize));
  MemoryDevice* const a = grid_;
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
  ::close(fd);
}

// An image whose size is off the device's grid: its final, partial block is
// read and written (and read-modify-written) by requests that end at the
// image's end, byte-exact.
TEST_F(FuseMount, ThePartialFinalBlockIsReadAndWritten) {
  constexpr uint64_t kSize = 4 * 4096 + 512;
  ASSERT_NO_FATAL_FAILURE(open_on_4k_grid(kSize));
  MemoryDevice* const a = grid_;
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

// Several unaligned writes into one block in flight at once (async direct
// I/O): each read-modify-write waits for the one before, so no write undoes
// another's bytes. The device's reads are held until all are submitted, and
// its writes until every read that could start has read.
TEST_F(FuseMount, ConcurrentUnalignedWritesIntoOneBlockKeepEachOthersBytes) {
  MemoryDevice* a = nullptr;
  table_.add(memory_export("a", 1 << 20, &a, false, 4096));
  start(FuseOptions{.direct_io = true, .readers = 2});
  const int fd = ::open((mnt_ + "/a").c_str(), O_RDWR | O_DIRECT);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  aio_context_t ctx = 0;
  ASSERT_EQ(::syscall(SYS_io_setup, 16, &ctx), 0) << std::strerror(errno);
  constexpr int kWriters = 8;
  constexpr size_t kSlot = 16;
  std::vector<std::vector<char>> data(kWriters);
  std::vector<iocb> cbs(kWriters);
  std::vector<iocb*> ptrs(kWriters);
  for (int i = 0; i < kWriters; ++i) {
    data[i].assign(kSlot, static_cast<char>('A' + i));
    cbs[i] = iocb{};
    cbs[i].aio_lio_opcode = IOCB_CMD_PWRITE;
    cbs[i].aio_fildes = static_cast<uint32_t>(fd);
    cbs[i].aio_buf = reinterpret_cast<uint64_t>(data[i].data());
    cbs[i].aio_nbytes = kSlot;
    cbs[i].aio_offset = static_cast<int64_t>(5 + i * kSlot);  // all in block 0, none aligned
    ptrs[i] = &cbs[i];
  }
  a->close_gate(Op::read);
  a->close_gate(Op::write);
  ASSERT_EQ(::syscall(SYS_io_submit, ctx, kWriters, ptrs.data()), kWriters) << std::strerror(errno);
  EXPECT_TRUE(test::eventually([&] { return a->in_flight(Op::read) >= 1; }, 5s));
  std::this_thread::sleep_for(200ms);  // every write has reached the front end by now
  a->open_gate(Op::read);
  std::this_thread::sleep_for(200ms);  // without the lock, every one has read the old block now
  a->open_gate(Op::write);
  std::vector<io_event> events(kWriters);
  int done = 0;
  while (done < kWriters) {
    timespec timeout{10, 0};
    const long n = ::syscall(SYS_io_getevents, ctx, 1, kWriters - done, events.data() + done, &timeout);
    ASSERT_GT(n, 0) << "writes did not complete";
    done += static_cast<int>(n);
  }
  for (const auto& ev : events) EXPECT_EQ(ev.res, static_cast<int64_t>(kSlot));
  ::syscall(SYS_io_destroy, ctx);
  ::close(fd);
  const auto got = a->contents(0, 4096);
  for (int i = 0; i < kWriters; ++i)
    for (size_t j = 0; j < kSlot; ++j)
      EXPECT_EQ(got[5 + i * kSlot + j], std::byte(static_cast<uint8_t>('A' + i))) << "writer " << i;
  EXPECT_EQ(a->max_in_flight(Op::read), 1u);  // the read-modify-writes took turns
}

// mount() finds a FUSE mount at the directory that answers nothing (its
// server never replied to INIT): its probes hang until that mount's
// connection ends. Meanwhile the front end's other calls return at once,
// a second mount() is refused, and the first then takes the stale mount's
// place.
TEST_F(FuseMount, AHungMountAtTheDirectoryBlocksNothingElse) {
  ASSERT_EQ(::mkdir(mnt_.c_str(), 0755), 0);
  const int hung = ::open("/dev/fuse", O_RDWR | O_CLOEXEC);
  ASSERT_GE(hung, 0);
  const std::string opts = "fd=" + std::to_string(hung) + ",rootmode=40000,user_id=0,group_id=0";
  ASSERT_EQ(::mount("bw-hung", mnt_.c_str(), "fuse", MS_NOSUID | MS_NODEV, opts.c_str()), 0) << std::strerror(errno);
  table_.add(memory_export("a", 4096, nullptr));
  front_ = std::make_unique<FuseFrontEnd>(loops_, table_, FuseOptions{});
  front_->set_on_unmounted([&] { unmounted_ = true; });
  runner_ = std::thread([&] { loops_.run(); });
  std::atomic<bool> first_failed{false};
  std::thread first([&] {
    try {
      front_->mount(mnt_);
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
      first_failed = true;
    }
  });
  // Well inside the probes by now. (Not asked through active(): before the
  // fix that call itself waited for the hung mount.)
  std::this_thread::sleep_for(500ms);
  auto others = std::async(std::launch::async, [&] {
    EXPECT_TRUE(front_->active());
    EXPECT_EQ(front_->mountpoint(), "");
    front_->unmount();  // nothing to unmount yet
    EXPECT_THROW(front_->mount(mnt_), std::runtime_error);
  });
  const bool prompt = others.wait_for(3s) == std::future_status::ready;
  EXPECT_TRUE(prompt) << "the front end's calls waited for the hung mount";
  ::close(hung);  // the hung mount's connection ends: ENOTCONN, a stale mount
  others.get();
  first.join();
  ASSERT_FALSE(first_failed);
  EXPECT_EQ(front_->mountpoint(), mnt_);
  EXPECT_TRUE(test::eventually([&] { return listing(mnt_) == std::set<std::string>{"a"}; }, 5s));
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
  g_fail_next_new_of_size = 2 * sizeof(void*);
  fd = ::open(path.c_str(), O_RDONLY);
  const int err = errno;
  g_fail_next_new_of_size = 0;
  EXPECT_EQ(fd, -1);
  EXPECT_EQ(err, ENOMEM);
  if (fd >= 0) ::close(fd);
  table_.remove("a");
  EXPECT_TRUE(test::eventually([&] { return exp.use_count() == 1; }, 5s))
      << "something still holds the export: " << exp.use_count();
}

// A reader that gets no memory for its next receive buffer (a write took the
// last one) waits and tries again instead of ending its loop: the next
// request is served once memory is back.
TEST_F(FuseMount, AReaderOutOfMemoryForItsBufferWaitsAndReadsOn) {
  MemoryDevice* a = nullptr;
  table_.add(memory_export("a", 1 << 20, &a));
  start(FuseOptions{.direct_io = true, .readers = 1});
  const int fd = ::open((mnt_ + "/a").c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  std::vector<char> buf(65536, 'x');
  fail_receive_buffers_for_test(3);
  ASSERT_EQ(::pwrite(fd, buf.data(), buf.size(), 0), static_cast<ssize_t>(buf.size()));  // takes the buffer
  const auto t0 = std::chrono::steady_clock::now();
  auto reading = std::async(std::launch::async, [&] { return ::pread(fd, buf.data(), buf.size(), 4096); });
  ASSERT_EQ(reading.wait_for(10s), std::future_status::ready) << "the reader never read again";
  EXPECT_EQ(reading.get(), static_cast<ssize_t>(buf.size()));
  // Three failed allocations, 50 ms apart, came before this read was read.
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 90ms);
  fail_receive_buffers_for_test(0);
  ::close(fd);
  EXPECT_EQ(a->contents(0, 1), std::vector<std::byte>{std::byte{'x'}});
}

// One O_DIRECT write by async I/O (it is in flight when this returns).
struct AioWriter {
  explicit AioWriter(int fd) : fd_(fd) { EXPECT_EQ(::syscall(SYS_io_setup, 8, &ctx_), 0) << std::strerror(errno); }
  ~AioWriter() { ::syscall(SYS_io_destroy, ctx_); }
  void submit(const void* data, size_t n, uint64_t off) {
    auto& cb = cbs_.emplace_back(std::make_unique<iocb>());
    *cb = iocb{};
    cb->aio_lio_opcode = IOCB_CMD_PWRITE;
    cb->aio_fildes = static_cast<uint32_t>(fd_);
    cb->aio_buf = reinterpret_cast<uint64_t>(data);
    cb->aio_nbytes = n;
    cb->aio_offset = static_cast<int64_t>(off);
    iocb* p = cb.get();
    ASSERT_EQ(::syscall(SYS_io_submit, ctx_, 1, &p), 1) << std::strerror(errno);
  }
  // Results of every write submitted, in completion order.
  std::vector<int64_t> wait_all() {
    std::vector<io_event> events(cbs_.size());
    size_t done = 0;
    while (done < cbs_.size()) {
      timespec timeout{10, 0};
      const long n = ::syscall(SYS_io_getevents, ctx_, 1, cbs_.size() - done, events.data() + done, &timeout);
      if (n <= 0) break;
      done += static_cast<size_t>(n);
    }
    std::vector<int64_t> out;
    for (size_t i = 0; i < done; ++i) out.push_back(events[i].res);
    return out;
  }
  int fd_;
  aio_context_t ctx_ = 0;
  std::vector<std::unique_ptr<iocb>> cbs_;
};

// An aligned write of a block while an unaligned write into it is being
// read-modify-written waits for it: it reaches the device only after the
// RMW wrote the block back, so it is not undone by it.
TEST_F(FuseMount, AnAlignedWriteWaitsForAReadModifyWriteOfItsBlock) {
  MemoryDevice* a = nullptr;
  table_.add(memory_export("a", 1 << 20, &a, false, 4096));
  start(FuseOptions{.direct_io = true, .readers = 2});
  const int fd = ::open((mnt_ + "/a").c_str(), O_RDWR | O_DIRECT);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  auto* whole = static_cast<char*>(std::aligned_alloc(4096, 4096));
  std::memset(whole, 'W', 4096);
  std::vector<char> patch(16, 'U');
  AioWriter aio(fd);
  a->close_gate(Op::read);
  aio.submit(patch.data(), patch.size(), 5);  // the RMW: holds the lock, its read waits at the gate
  ASSERT_TRUE(test::eventually([&] { return a->in_flight(Op::read) == 1; }, 5s));
  aio.submit(whole, 4096, 0);  // aligned, the same block
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(a->in_flight(Op::write), 0u) << "the aligned write went ahead of the RMW";
  a->open_gate(Op::read);
  const auto results = aio.wait_all();
  ASSERT_EQ(results.size(), 2u);
  for (auto r : results) EXPECT_GT(r, 0);
  EXPECT_EQ(a->contents(0, 4096), std::vector<std::byte>(4096, std::byte{'W'}));  // the later write wins
  std::free(whole);
  ::close(fd);
}

// The other way round: an unaligned write into a block that an aligned write
// (which took no lock) is still writing waits for it before it reads the
// block, so it keeps the aligned write's bytes around its own.
TEST_F(FuseMount, AReadModifyWriteWaitsForAnAlignedWriteInFlight) {
  MemoryDevice* a = nullptr;
  table_.add(memory_export("a", 1 << 20, &a, false, 4096));
  start(FuseOptions{.direct_io = true, .readers = 2});
  const int fd = ::open((mnt_ + "/a").c_str(), O_RDWR | O_DIRECT);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  auto* whole = static_cast<char*>(std::aligned_alloc(4096, 4096));
  std::memset(whole, 'W', 4096);
  std::vector<char> patch(16, 'U');
  AioWriter aio(fd);
  a->close_gate(Op::write);
  aio.submit(whole, 4096, 0);  // aligned: at the device, held at the gate
  ASSERT_TRUE(test::eventually([&] { return a->in_flight(Op::write) == 1; }, 5s));
  aio.submit(patch.data(), patch.size(), 5);
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(a->calls(Op::read), 0u) << "the RMW read the block under an aligned write in flight";
  a->open_gate(Op::write);
  const auto results = aio.wait_all();
  ASSERT_EQ(results.size(), 2u);
  for (auto r : results) EXPECT_GT(r, 0);
  auto expect = std::vector<std::byte>(4096, std::byte{'W'});
  std::fill(expect.begin() + 5, expect.begin() + 21, std::byte{'U'});
  EXPECT_EQ(a->contents(0, 4096), expect);
  std::free(whole);
  ::close(fd);
}

// With mount_timeout, a hung mount at the directory fails mount() with a
// clear error once the time is up, instead of waiting for it (the daemon's
// start-up would hang). The probe left waiting changes nothing: once the
// hung mount's connection ends, a mount() succeeds.
TEST_F(FuseMount, AHungMountAtTheDirectoryFailsTheMountAfterTheTimeout) {
  ASSERT_EQ(::mkdir(mnt_.c_str(), 0755), 0);
  const int hung = ::open("/dev/fuse", O_RDWR | O_CLOEXEC);
  ASSERT_GE(hung, 0);
  const std::string opts = "fd=" + std::to_string(hung) + ",rootmode=40000,user_id=0,group_id=0";
  ASSERT_EQ(::mount("bw-hung", mnt_.c_str(), "fuse", MS_NOSUID | MS_NODEV, opts.c_str()), 0) << std::strerror(errno);
  table_.add(memory_export("a", 4096, nullptr));
  front_ = std::make_unique<FuseFrontEnd>(loops_, table_, FuseOptions{.mount_timeout = 300ms});
  front_->set_on_unmounted([&] { unmounted_ = true; });
  runner_ = std::thread([&] { loops_.run(); });
  auto mounting = std::async(std::launch::async, [&]() -> std::string {
    try {
      front_->mount(mnt_);
      return "mounted";
    } catch (const std::runtime_error& e) {
      return e.what();
    }
  });
  const bool returned = mounting.wait_for(5s) == std::future_status::ready;
  if (!returned) ::close(hung);  // let the test end
  ASSERT_TRUE(returned) << "mount() waited for the hung mount";
  const std::string error = mounting.get();
  EXPECT_NE(error.find("did not answer within 300 ms"), std::string::npos) << error;
  EXPECT_NE(error.find(mnt_), std::string::npos) << error;
  EXPECT_FALSE(front_->active());
  ::close(hung);  // now a stale mount (ENOTCONN): detached by the next mount()
  unmounted_ = false;
  front_->mount(mnt_);
  EXPECT_EQ(front_->mountpoint(), mnt_);
  std::this_thread::sleep_for(200ms);  // the abandoned probe has woken up by now
  EXPECT_TRUE(mounted_as(mnt_, "fuse.blockway"));
  EXPECT_TRUE(test::eventually([&] { return listing(mnt_) == std::set<std::string>{"a"}; }, 5s));
}

// A file kept open across unmount(): the mount is detached at once and the
// session ends after shutdown_timeout. Something mounted at the directory
// meanwhile must stay mounted (libfuse's own unmount would umount2 the path
// once more, as root).
TEST_F(FuseMount, EndingADetachedSessionLeavesWhatIsMountedThereSince) {
  table_.add(memory_export("a", 4096, nullptr));
  start(FuseOptions{.shutdown_timeout = 300ms});
  const int fd = ::open((mnt_ + "/a").c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  front_->unmount();
  ASSERT_TRUE(test::eventually([&] { return !mounted_as(mnt_, "fuse.blockway"); }, 5s));
  ASSERT_EQ(::mount("bw-tmpfs", mnt_.c_str(), "tmpfs", 0, "size=1m"), 0) << std::strerror(errno);
  ASSERT_TRUE(test::eventually([&] { return unmounted_.load(); }, 10s));
  EXPECT_TRUE(mounted_as(mnt_, "tmpfs")) << "the session's end unmounted the tmpfs mounted since";
  char c = 0;
  EXPECT_EQ(::pread(fd, &c, 1, 0), -1);  // the session is over
  ::close(fd);
  while (mounted_as(mnt_, "tmpfs") && ::umount2(mnt_.c_str(), MNT_DETACH) == 0) {
  }
}

}  // namespace
}  // namespace blockway::fuse
