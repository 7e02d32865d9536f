// DirectWriter: writes to the cache file with O_DIRECT through Linux native
// AIO (io_submit), for the fills whose bytes a read miss's reply already
// holds (CacheLayer::write_fill).
//
// Why: on a cold sequential read the cache file's buffered write was the
// largest cost the cache adds (the page-cache copy, new pages zeroed, ext4's
// delayed allocation, the inode lock the loops spin on, the flusher's
// writeback later). A direct write leaves the bytes where they are; the disk
// reads them by DMA. Submitted asynchronously, because ext4 holds the inode
// lock exclusively across a *synchronous* direct write that allocates (a
// sparse cache file: every fill), which serialised the fills when they were
// pwrite()s on the blocking pool (measured: 290 vs 852 MB/s, perf:
// rwsem_down_write_slowpath); an asynchronous one drops it once submitted.
//
// Thread model: write() may be called on any thread (io_submit is thread-
// safe); the bytes must stay valid until its task completes. One thread of
// its own reaps the completions (it sleeps in poll() on an eventfd the
// kernel signals per completion, IOCB_FLAG_RESFD, and on a stop eventfd, so
// an idle cache wakes nothing) and sets each write's SharedEvent; the writer resumes on
// its own executor. No Asio object lives here, so nothing depends on an
// event loop outliving the writer (the tests' crash() tears loops down
// first). The map of writes in flight is under a mutex.
#pragma once

#include "core/task.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <system_error>

namespace blockway::cache {

class DirectWriter {
 public:
  // Opens `path` with O_DIRECT and an AIO context; null (with `why` set)
  // when the file system or the kernel refuses either.
  static std::unique_ptr<DirectWriter> open(const std::string& path, std::string& why);
  // Waits (bounded) for writes still in flight, then frees everything.
  ~DirectWriter();
  DirectWriter(const DirectWriter&) = delete;
  DirectWriter& operator=(const DirectWriter&) = delete;

  // Writes `bytes` at `offset`. Offset, length and address must be aligned
  // to the file's direct I/O alignment (4 KiB is safe): else EINVAL. A short
  // write is EIO. EAGAIN when too many writes are in flight.
  core::Task<std::error_code> write(std::span<const std::byte> bytes, uint64_t offset);

  // An unclean stop (tests' crash()): waits for the kernel to finish what is
  // in flight, then frees the waiters of those writes without resuming them.
  void abandon() noexcept;

  struct State;

 private:
  explicit DirectWriter(std::shared_ptr<State> st) : st_(std::move(st)) {}
  std::shared_ptr<State> st_;
};

}  // namespace blockway::cache
