#include "remote/file/file_device.hpp"

#include "core/logging.hpp"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>

namespace blockway::remote::file {

using core::ByteRange;
using core::errno_code;
using core::IoFlags;
using core::Support;
using core::Task;

namespace {

// Reads exactly buf.size() bytes at offset with blocking preads.
std::error_code pread_all(int fd, std::span<std::byte> buf, uint64_t offset) {
  while (!buf.empty()) {
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_code(errno);
    }
    if (n == 0) return errno_code(EIO);  // the file shrank under us
    buf = buf.subspan(static_cast<size_t>(n));
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

// Reads what the page cache holds without blocking: advances buf and offset
// past the bytes read and stops at the first byte that would need the disk.
// Sets `unsupported` if the kernel refuses RWF_NOWAIT here.
std::error_code pread_cached(int fd, std::span<std::byte>& buf, uint64_t& offset, bool& unsupported) {
  while (!buf.empty()) {
    iovec iov{buf.data(), buf.size()};
    const ssize_t n = ::preadv2(fd, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
    if (n > 0) {
      buf = buf.subspan(static_cast<size_t>(n));
      offset += static_cast<uint64_t>(n);
      continue;
    }
    if (n == 0) return errno_code(EIO);  // the file shrank under us
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return {};
    if (errno == EOPNOTSUPP || errno == EINVAL) {
      unsupported = true;
      return {};
    }
    return errno_code(errno);
  }
  return {};
}

std::error_code pwrite_all(int fd, std::span<const std::byte> buf, uint64_t offset, int rwf) {
  while (!buf.empty()) {
    iovec iov{const_cast<std::byte*>(buf.data()), buf.size()};
    const ssize_t n = ::pwritev2(fd, &iov, 1, static_cast<off_t>(offset), rwf);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      return errno_code(e == EDQUOT || e == EFBIG ? ENOSPC : e);
    }
    buf = buf.subspan(static_cast<size_t>(n));
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

std::error_code sync_fd(int fd) { return ::fdatasync(fd) == 0 ? std::error_code{} : errno_code(errno); }

}  // namespace

FileDevice::FileDevice(std::string path, bool read_only, boost::asio::thread_pool& blocking)
    : path_(std::move(path)), read_only_(read_only), blocking_(blocking) {
  fd_ = ::open(path_.c_str(), (read_only_ ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (fd_ < 0 && !read_only_ && (errno == EACCES || errno == EROFS || errno == EPERM)) {
    const int why = errno;
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    read_only_ = true;
    // Said once here, or an operator only sees writes refused: the usual
    // cause is the packaged unit's ProtectSystem=strict (EROFS outside its
    // directories) or the image's owner (EACCES for the blockway user).
    if (fd_ >= 0)
      core::logger("file")->warn("{}: {}: serving it read-only", path_, std::strerror(why));
  }
  if (fd_ < 0) throw std::system_error(errno, std::system_category(), "cannot open " + path_);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const int e = errno;
    ::close(fd_);
    throw std::system_error(e, std::system_category(), "cannot stat " + path_);
  }
  if (S_ISBLK(st.st_mode)) {
    is_block_device_ = true;
    uint64_t size = 0;
    if (::ioctl(fd_, BLKGETSIZE64, &size) != 0) {
      const int e = errno;
      ::close(fd_);
      throw std::system_error(e, std::system_category(), "cannot get the size of " + path_);
    }
    size_.store(size);
  } else if (S_ISREG(st.st_mode)) {
    size_.store(static_cast<uint64_t>(st.st_size));
  } else {
    ::close(fd_);
    throw std::system_error(EINVAL, std::system_category(),
                            path_ + " is neither a regular file nor a block device");
  }
}

FileDevice::~FileDevice() {
  if (fd_ >= 0) ::close(fd_);
}

core::Geometry FileDevice::geometry() const noexcept {
  return {.size = size_.load(std::memory_order_acquire), .min_block = 1, .preferred_block = 4096,
          .max_transfer = 64u << 20};
}

uint64_t FileDevice::current_size() noexcept {
  uint64_t now = 0;
  if (is_block_device_) {
    if (::ioctl(fd_, BLKGETSIZE64, &now) != 0) return size_.load(std::memory_order_acquire);
  } else {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) return size_.load(std::memory_order_acquire);
    now = static_cast<uint64_t>(st.st_size);
  }
  uint64_t known = size_.load(std::memory_order_relaxed);
  while (known < now && !size_.compare_exchange_weak(known, now, std::memory_order_acq_rel)) {
  }
  return now;
}

core::Capabilities FileDevice::capabilities() const noexcept {
  core::Capabilities c;
  c.read_only = read_only_;
  c.flush = Support::native;
  c.fua = Support::native;
  c.trim = Support::native;
  c.zero = Support::native;
  c.extents = is_block_device_ ? Support::none : Support::native;
  c.prefetch = Support::native;
  c.multi_conn = true;  // one fd, one page cache: a flush covers every connection
  return c;
}

Task<std::error_code> FileDevice::read(std::span<std::byte> buf, uint64_t offset, IoFlags) {
  if (nowait_reads_.load(std::memory_order_relaxed)) {
    // Fast path: served from the page cache without leaving this thread.
    bool unsupported = false;
    if (auto ec = pread_cached(fd_, buf, offset, unsupported)) co_return ec;
    if (unsupported) nowait_reads_.store(false, std::memory_order_relaxed);
    if (buf.empty()) co_return std::error_code{};
  }
  co_return co_await core::offload(blocking_, [fd = fd_, buf, offset] { return pread_all(fd, buf, offset); });
}

Task<std::error_code> FileDevice::write(std::span<const std::byte> buf, uint64_t offset,
                                        IoFlags flags) {
  if (flags & core::kFua) {
    co_return co_await core::offload(
        blocking_, [fd = fd_, buf, offset] { return pwrite_all(fd, buf, offset, RWF_DSYNC); });
  }
  co_return pwrite_all(fd_, buf, offset, 0);
}

Task<std::error_code> FileDevice::flush() {
  co_return co_await core::offload(blocking_, [fd = fd_] { return sync_fd(fd); });
}

Task<std::error_code> FileDevice::fallocate_range(int mode, ByteRange range, IoFlags flags) {
  co_return co_await core::offload(blocking_, [fd = fd_, mode, range, flags]() -> std::error_code {
    while (::fallocate(fd, mode, static_cast<off_t>(range.offset), static_cast<off_t>(range.length)) != 0) {
      if (errno == EINTR) continue;
      return errno_code(errno == EOPNOTSUPP ? ENOTSUP : errno);
    }
    return (flags & core::kFua) ? sync_fd(fd) : std::error_code{};
  });
}

Task<std::error_code> FileDevice::trim(ByteRange range, IoFlags flags) {
  co_return co_await fallocate_range(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, range, flags);
}

Task<std::error_code> FileDevice::zero(ByteRange range, IoFlags flags) {
  // A punched hole reads as zeroes and frees space; NO_HOLE asks to keep the
  // blocks allocated, which ZERO_RANGE does without writing data.
  const int mode = (flags & core::kNoHole) ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                                               : FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  co_return co_await fallocate_range(mode, range, flags);
}

Task<std::error_code> FileDevice::block_status(ByteRange range, core::ExtentList& out) {
  const auto data_extent = [&] { out.push_back({range.length, 0}); };
  if (is_block_device_ || !can_seek_data_.load(std::memory_order_relaxed)) {
    data_extent();
    co_return std::error_code{};
  }
  // At most 64 extents per call; the caller asks again for the rest.
  uint64_t pos = range.offset;
  const uint64_t end = range.end();
  while (pos < end && out.size() < 64) {
    const off_t data = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0 && errno == ENXIO) {  // only a hole up to end of file
      out.push_back({end - pos, core::kExtentHole | core::kExtentZero});
      break;
    }
    if (data < 0) {
      if (out.empty()) {
        if (errno == EINVAL || errno == EOPNOTSUPP) can_seek_data_.store(false);
        data_extent();
      }
      break;
    }
    if (static_cast<uint64_t>(data) > pos) {
      const uint64_t hole_end = std::min<uint64_t>(static_cast<uint64_t>(data), end);
      out.push_back({hole_end - pos, core::kExtentHole | core::kExtentZero});
      pos = hole_end;
      continue;
    }
    const off_t hole = ::lseek(fd_, static_cast<off_t>(pos), SEEK_HOLE);
    const uint64_t data_end =
        hole < 0 ? end : std::min<uint64_t>(static_cast<uint64_t>(hole), end);
    out.push_back({data_end - pos, 0});
    pos = data_end;
  }
  co_return std::error_code{};
}

Task<std::error_code> FileDevice::prefetch(ByteRange range) {
  // Starts kernel readahead; returns before the data is read.
  const int rc = ::posix_fadvise(fd_, static_cast<off_t>(range.offset),
                                 static_cast<off_t>(range.length), POSIX_FADV_WILLNEED);
  co_return rc == 0 ? std::error_code{} : errno_code(rc);
}

}  // namespace blockway::remote::file
