// FileDevice: a raw image file or a block device on this host.
//
// Its size is the file's when it opens; current_size() looks again (the
// stack calls it for each new client of an uncached export).
//
// Thread model: stateless apart from the fd and a few capability latches
// (atomics), so any number of threads may call it at once. Reads first try
// preadv2(RWF_NOWAIT) on the calling event loop, which succeeds at memory
// speed when the data is in the page cache; on a miss the read moves to the
// blocking pool. Plain writes go to the page cache inline (pwrite only blocks
// under dirty-page throttling, and RWF_NOWAIT is not supported for buffered
// writes on ext4); FUA writes, flushes and fallocate calls always run on the
// blocking pool because they wait for the disk.
#pragma once

#include "core/block_device.hpp"

#include <boost/asio/thread_pool.hpp>

#include <atomic>
#include <string>

namespace blockway::remote::file {

class FileDevice final : public core::BlockDevice {
 public:
  // Opens `path`; falls back to read-only when the file cannot be written and
  // read_only was not asked for. Throws std::system_error naming the path.
  FileDevice(std::string path, bool read_only, boost::asio::thread_pool& blocking);
  ~FileDevice() override;
  FileDevice(const FileDevice&) = delete;
  FileDevice& operator=(const FileDevice&) = delete;

  [[nodiscard]] core::Geometry geometry() const noexcept override;
  [[nodiscard]] core::Capabilities capabilities() const noexcept override;
  [[nodiscard]] std::string describe() const override { return "file:" + path_; }

  // The image's size now (fstat, or BLKGETSIZE64 for a block device): a
  // file can grow under the export (truncate -s, qemu-img resize, lvextend)
  // and nothing tells us. geometry() follows a larger size from then on; a
  // smaller one is returned but not taken (requests past the image's end
  // fail as the kernel answers them). On an error, the size already known.
  // Any thread; a few microseconds (one system call).
  [[nodiscard]] uint64_t current_size() noexcept;

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset,
                                      core::IoFlags flags) override;
  core::Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset,
                                       core::IoFlags flags) override;
  core::Task<std::error_code> flush() override;
  core::Task<std::error_code> trim(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> zero(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> block_status(core::ByteRange range,
                                              core::ExtentList& out) override;
  core::Task<std::error_code> prefetch(core::ByteRange range) override;

 private:
  core::Task<std::error_code> fallocate_range(int mode, core::ByteRange range,
                                                 core::IoFlags flags);

  std::string path_;
  int fd_ = -1;
  std::atomic<uint64_t> size_{0};
  bool is_block_device_ = false;
  bool read_only_ = false;
  boost::asio::thread_pool& blocking_;
  std::atomic<bool> nowait_reads_{true};  // cleared if the kernel refuses RWF_NOWAIT
  std::atomic<bool> can_seek_data_{true};
};

}  // namespace blockway::remote::file
