#include "tests/unit/fuse/fuse_mount_fixture.hpp"

#include "fuse/mount_point.hpp"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <new>

// GCC sees free() of what operator new returned once both are inlined; here
// they are the same allocator.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

namespace blockway::fuse::test_support {
std::atomic<size_t> fail_next_new_of_size{0};
}  // namespace blockway::fuse::test_support

void* operator new(size_t n) {
  auto& armed_size = blockway::fuse::test_support::fail_next_new_of_size;
  size_t armed = armed_size.load(std::memory_order_relaxed);
  if (armed != 0 && armed == n && armed_size.compare_exchange_strong(armed, 0)) throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace blockway::fuse::test_support {

using namespace std::chrono_literals;

std::shared_ptr<core::Export> memory_export(const std::string& name, uint64_t size, test::MemoryDevice** raw,
                                            bool read_only, uint32_t min_block) {
  core::Capabilities caps;
  caps.flush = core::Support::native;
  caps.zero = core::Support::native;
  caps.extents = core::Support::native;
  auto dev = std::make_unique<test::MemoryDevice>(core::Geometry{.size = size, .min_block = min_block}, caps);
  if (raw) *raw = dev.get();
  auto exp = std::make_shared<core::Export>();
  exp->name = name;
  exp->uri = "memory:";
  exp->device = std::make_shared<core::CheckedDevice>(std::move(dev), read_only);
  return exp;
}

bool mounted_as(const std::string& dir, const std::string& type) {
  const auto types = mount_types(dir);
  return std::find(types.begin(), types.end(), type) != types.end();
}

std::set<std::string> listing(const std::string& dir) {
  std::set<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) out.insert(e.path().filename().string());
  return out;
}

void FuseMount::SetUp() {
  if (::geteuid() != 0 || ::access("/dev/fuse", R_OK | W_OK) != 0) GTEST_SKIP() << "needs root and /dev/fuse";
  char tmpl[] = "/tmp/bw-fuse-unit-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  dir_ = tmpl;
  mnt_ = dir_ + "/mnt";
}

void FuseMount::TearDown() {
  if (front_) {
    front_->unmount();
    EXPECT_TRUE(test::eventually([&] { return unmounted_.load(); }, 10s));
  }
  loops_.release();
  if (runner_.joinable()) runner_.join();
  front_.reset();
  if (!dir_.empty()) std::filesystem::remove_all(dir_);
}

void FuseMount::start(FuseOptions options) {
  front_ = std::make_unique<FuseFrontEnd>(loops_, table_, options);
  front_->set_on_unmounted([&] { unmounted_ = true; });
  front_->mount(mnt_);
  runner_ = std::thread([&] { loops_.run(); });
}

void FuseMount::open_a(uint64_t size, uint32_t min_block, FuseOptions options, int flags) {
  table_.add(memory_export("a", size, &dev_, false, min_block));
  start(options);
  fd_ = ::open((mnt_ + "/a").c_str(), flags);
  ASSERT_GE(fd_, 0) << std::strerror(errno);
}

void FuseMount::open_on_4k_grid(uint64_t size) {
  ASSERT_NO_FATAL_FAILURE(open_a(size, 4096, FuseOptions{.direct_io = true}, O_RDWR));
  dev_->fill_pattern(0, size);
  expect_ = dev_->contents(0, size);
}

void FuseMount::open_direct_on_4k_grid() {
  ASSERT_NO_FATAL_FAILURE(open_a(1 << 20, 4096, FuseOptions{.direct_io = true, .readers = 2}, O_RDWR | O_DIRECT));
  whole_.assign(4096, 'W');
  patch_.assign(16, 'U');
}

void FuseMount::put(uint64_t off, size_t n, uint8_t seed, uint8_t step) {
  std::vector<std::byte> data(n);
  for (size_t i = 0; i < n; ++i) data[i] = std::byte(static_cast<uint8_t>(seed + i * step));
  ASSERT_EQ(::pwrite(fd_, data.data(), n, static_cast<off_t>(off)), static_cast<ssize_t>(n)) << off << "+" << n;
  std::copy(data.begin(), data.end(), expect_.begin() + static_cast<ptrdiff_t>(off));
}

AioWriter::AioWriter(int fd) : fd_(fd) { EXPECT_EQ(::syscall(SYS_io_setup, 16, &ctx_), 0) << std::strerror(errno); }

AioWriter::~AioWriter() { ::syscall(SYS_io_destroy, ctx_); }

void AioWriter::submit(const void* data, size_t n, uint64_t off) {
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

std::vector<int64_t> AioWriter::wait_all() {
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

}  // namespace blockway::fuse::test_support
