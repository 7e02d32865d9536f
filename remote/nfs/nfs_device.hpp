// NfsDevice: an image file on an NFS server (v3 or v4), through libnfs.
//
// URIs: nfs://server[:port]/path/to/image[?version=3|4] (see nfs_uri.hpp for
// how the path splits into the mounted directory and the file). Every session
// is mounted and the file opened and measured (GETATTR) before the device is
// returned, so a wrong export path, a missing file or a server that is not
// there stops the daemon at start-up. The file is opened read-write unless
// the export is read-only or the server refuses write access; then it is
// served read-only.
//
// Data path: libnfs's asynchronous API (nfs_pread_async, nfs_pwrite_async,
// nfs_fsync_async = COMMIT). One session (nfs_context + open file) per event
// loop by default, each with many RPCs in flight; a session's context is only
// ever touched on its loop's thread, driven by an FdWatcher
// (remote/common/fd_watcher.hpp),
// and libnfs's callbacks only record the result and post the awaiting
// coroutine's continuation (never resume it inside libnfs). A request issued
// on a loop that owns a session uses it directly; from any other thread it
// hops to a session's loop (round-robin) and back. Reads and writes larger
// than the server's rsize/wsize are split into RPCs that are queued back to
// back on the same session (pipelined, one completion for the caller).
// libnfs 4.0 copies read data out of its receive buffer into ours: one
// memcpy per read. libnfs 4.0 also encodes every NFSv4 COMPOUND into a fixed
// 4 KiB buffer, so NFSv4 writes go out in RPCs of at most 3 KiB of data
// (NFSv3 uses the server's wsize).
//
// Durability: libnfs writes UNSTABLE; flush sends COMMIT for the file, which
// the server applies to the file, so one COMMIT covers the writes of every
// session (multi_conn). A FUA write is a FILE_SYNC WRITE on NFSv3 (through a
// second handle opened O_SYNC) when it fits one WRITE, else (and on NFSv4,
// where libnfs 4.0 ignores O_SYNC) the writes followed by a COMMIT. A server that restarts loses uncommitted data
// and the sessions with it; RetryLayer's generation check then fails the next
// flush once with EIO. NFS has no discard or write-zeroes in libnfs 4.0 (no
// ALLOCATE/DEALLOCATE, no SEEK_DATA): trim is not offered, zero is emulated,
// there is no block status.
//
// Failures: libnfs's own reconnect is switched off. A request with no reply
// within io-timeout kills its session (every request on it fails with
// ETIMEDOUT); an RPC-level failure (socket error, libnfs reports -EFAULT or
// -EINTR) or nfs_service() failing kills the session with ECONNRESET; later
// requests fail fast with ENOTCONN until reconnect() mounts fresh sessions on
// the blocking pool (each step bounded by io-timeout) and swaps them in;
// generation() counts the swaps. NFS status errors (EIO, ENOSPC, EDQUOT,
// EACCES, ESTALE...) are passed through as errno values.
//
// NFSv4 leases: libnfs 4.0 does not renew its lease, so an idle v4 session
// reads one byte every `keepalive` (20 s; a READ with the open stateid
// renews the lease); close() stops that timer so the loops can finish. An
// NFSv4 error that says our state is gone anyway (EXPIRED, STALE_CLIENTID,
// BAD_STATEID...) counts as a lost session: a new one opens the file again.
//
// Thread model: any method may be called from any event-loop thread. The
// session objects are fixed at construction; what changes (context, open
// file, in-flight list, timers) is confined to each session's loop.
// connected() and generation() are atomics. reconnect() is never called
// concurrently with itself (RetryLayer's contract). The device must be
// destroyed after the loops stopped running its sessions.
#pragma once

#include "core/event_loops.hpp"
#include "core/remote_device.hpp"
#include "remote/common/command_slots.hpp"
#include "remote/common/loop_session.hpp"
#include "remote/nfs/nfs_uri.hpp"

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace blockway::remote::nfs {

struct NfsOp;  // one read, write or commit, in nfs_device.cpp

struct NfsOptions {
  unsigned connections = 0;  // 0: one per event loop
  std::chrono::milliseconds io_timeout{30000};
  std::chrono::milliseconds keepalive{20000};  // NFSv4 lease renewal while idle; 0: none
  // Data in flight per session: no bound by default. 2 MiB (iSCSI's default)
  // gave no gain against ganesha that held up from run to run here.
  uint64_t inflight_bytes = common::kUnboundedInflight;
};

class NfsDevice final : public core::RemoteDevice {
 public:
  // Mounts synchronously. Throws BackendError (remote/backend.hpp) with a
  // message naming the URI and what the server or libnfs said.
  NfsDevice(std::string uri, NfsTarget target, bool read_only, NfsOptions options, core::EventLoops& loops);
  ~NfsDevice() override;
  NfsDevice(const NfsDevice&) = delete;
  NfsDevice& operator=(const NfsDevice&) = delete;

  [[nodiscard]] core::Geometry geometry() const noexcept override { return geometry_; }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override { return caps_; }
  [[nodiscard]] std::string describe() const override { return "nfs:" + uri_; }

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> flush() override;
  core::Task<void> close() override;

  core::Task<std::error_code> reconnect() override;
  [[nodiscard]] bool connected() const noexcept override;
  [[nodiscard]] uint64_t generation() const noexcept override { return sessions_.generation(); }

  [[nodiscard]] size_t connection_count() const noexcept { return sessions_.size(); }

  class Session;
  struct Request;
  struct MountedFile;

 private:
  core::Task<std::error_code> submit(NfsOp op);
  core::Task<std::error_code> submit_on(Session& s, NfsOp op);
  core::Task<std::error_code> commit();

  std::string uri_;
  NfsTarget target_;
  NfsOptions options_;
  core::EventLoops& loops_;
  core::Geometry geometry_;
  core::Capabilities caps_;
  uint32_t read_max_ = 0;
  uint32_t write_max_ = 0;
  bool stable_writes_ = false;  // every session has an O_SYNC handle (NFSv3)
  common::SessionSet<Session> sessions_;
};

}  // namespace blockway::remote::nfs
