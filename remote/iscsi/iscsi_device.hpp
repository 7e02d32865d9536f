// IscsiDevice: one LUN of an iSCSI target, reached through libiscsi.
//
// Start-up: every session is logged in (CHAP when the URI carries
// user%password), and the LUN is probed, before the device is returned, so a
// wrong portal, target name, LUN or secret stops the daemon with a message
// that says which. The probe reads READ CAPACITY(16) (size, block size,
// LBPME/LBPRZ), the VPD pages Block Limits (0xB0: maximum transfer, UNMAP and
// WRITE SAME limits) and Logical Block Provisioning (0xB2: UNMAP and
// WRITE SAME with UNMAP), and MODE SENSE (write protect, DPO/FUA). Commands
// are only ever used where the LUN says it has them: READ(16)/WRITE(16) (FUA
// when DPOFUA), SYNCHRONIZE CACHE(16), UNMAP for trim, WRITE SAME(16) (with
// the UNMAP bit where unmapped blocks read as zeroes) for write-zeroes, and
// GET LBA STATUS for block status when the LUN is thin-provisioned.
// Write-zeroes on a LUN that is not thin (or has no LBPWS) is WRITE SAME(16)
// without UNMAP: one block of zeroes crosses the wire and the target writes
// the range, split at the Block Limits page's MAXIMUM WRITE SAME LENGTH. It
// is offered where that page exists; a LUN that answers it with ILLEGAL
// REQUEST (invalid opcode or CDB field) is remembered, and from then on
// zero() says EOPNOTSUPP and CheckedDevice writes zeroes, as without it.
//
// Data path: libiscsi's asynchronous API, many commands in flight per
// session, buffers handed to libiscsi as iovecs (no copy). Each session
// belongs to one event loop and its iscsi_context is only touched on that
// loop's thread, driven by an FdWatcher (remote/common/fd_watcher.hpp); completions
// are posted to the awaiting coroutine's executor. A request issued on a loop
// that owns a session uses it; from any other thread it hops to a session's
// loop (round-robin). SYNCHRONIZE CACHE acts on the LUN's cache, not on a
// session, so one flush covers writes completed on every session
// (multi-conn).
//
// Failures: sense data is mapped by scsi_outcome() (scsi_errors.hpp); UNIT
// ATTENTION, BUSY and the like are retried here a few times. libiscsi's own
// automatic reconnect is off: a lost session fails its commands with a
// connection error and later ones fast with ENOTCONN, and RetryLayer calls
// reconnect(), which logs in fresh sessions on the blocking pool (each
// bounded by io-timeout) and swaps them in on their loops; generation()
// counts the swaps. A command without an answer within io-timeout drops its
// session (every command on it fails with ETIMEDOUT).
//
// Thread model: any method may be called from any event-loop thread. The
// session objects are fixed at construction; what changes (context, in-flight
// list, timer) is confined to each session's loop. connected() and
// generation() are atomics. reconnect() is never called concurrently with
// itself (RetryLayer's contract). The device must be destroyed after the
// loops stopped running its sessions.
#pragma once

#include "core/event_loops.hpp"
#include "core/remote_device.hpp"
#include "remote/common/command_slots.hpp"
#include "remote/common/loop_session.hpp"
#include "remote/iscsi/iscsi_uri.hpp"

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace blockway::remote::iscsi {

struct IscsiOptions {
  unsigned sessions = 0;  // 0: one per event loop
  std::chrono::milliseconds io_timeout{30000};
  std::string initiator = "iqn.2026-11.io.blockway:initiator";
  uint64_t inflight_bytes = common::kDefaultInflightBytes;  // data in flight per session
  // Write-zeroes as WRITE SAME without UNMAP (the target writes the zeroes);
  // off: CheckedDevice sends them, for a target whose WRITE SAME is slower
  // than the wire (tgt writes it one block per system call).
  bool write_same = true;
};

// What the probe found out about the LUN (also for tests and logs).
struct IscsiLunInfo {
  uint64_t blocks = 0;
  uint32_t block_size = 512;
  uint32_t physical_exponent = 0;  // log2(logical blocks per physical block)
  bool thin = false;               // LBPME: provisioning management, GET LBA STATUS
  bool unmapped_reads_zero = false;  // LBPRZ
  bool write_protected = false;
  bool dpofua = false;
  bool has_block_limits = false;
  uint32_t max_transfer_blocks = 0;  // 0: no limit given
  uint32_t optimal_transfer_blocks = 0;
  uint32_t max_unmap_blocks = 0;
  uint32_t max_unmap_descriptors = 0;
  uint64_t max_write_same_blocks = 0;
  bool unmap = false;       // LBPU
  bool write_same_unmap = false;  // LBPWS
};

class IscsiDevice final : public core::RemoteDevice {
 public:
  // Connects synchronously. Throws BackendError (remote/backend.hpp) with a
  // message naming the URI (password masked) and what went wrong.
  IscsiDevice(IscsiUri uri, bool read_only, IscsiOptions options, core::EventLoops& loops);
  ~IscsiDevice() override;
  IscsiDevice(const IscsiDevice&) = delete;
  IscsiDevice& operator=(const IscsiDevice&) = delete;

  [[nodiscard]] core::Geometry geometry() const noexcept override { return geometry_; }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override { return caps_; }
  [[nodiscard]] std::string describe() const override;

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> flush() override;
  core::Task<std::error_code> trim(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> zero(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> block_status(core::ByteRange range, core::ExtentList& out) override;

  core::Task<std::error_code> reconnect() override;
  [[nodiscard]] bool connected() const noexcept override;
  [[nodiscard]] uint64_t generation() const noexcept override { return sessions_.generation(); }

  [[nodiscard]] const IscsiLunInfo& lun_info() const noexcept { return info_; }
  [[nodiscard]] size_t session_count() const noexcept { return sessions_.size(); }

  class Session;
  struct Request;

 private:
  // data_bytes: what the command moves, charged to the session's in-flight
  // budget (remote/common/command_slots.hpp).
  template <class Issue>
  core::Task<std::error_code> submit(Issue issue, uint64_t data_bytes = 0);
  template <class Issue>
  core::Task<std::error_code> submit_on(Session& s, Issue issue, uint64_t data_bytes = 0);
  template <class Issue>
  core::Task<std::error_code> submit_once(Session& s, Issue& issue);
  // Trim and zero: commands of at most `step` blocks from `lba` on.
  // issue(ctx, lun, request, callback, first_lba, count) queues one.
  template <class Issue>
  core::Task<std::error_code> submit_blocks(uint64_t lba, uint64_t blocks, uint64_t step, Issue issue);

  IscsiUri uri_;
  bool read_only_ = false;
  IscsiOptions options_;
  core::EventLoops& loops_;
  IscsiLunInfo info_;
  core::Geometry geometry_;
  core::Capabilities caps_;
  std::vector<unsigned char> zero_block_;  // WRITE SAME's one block of zeroes
  // The LUN refused WRITE SAME without UNMAP once: never sent again.
  std::atomic<bool> write_same_refused_{false};
  // The LUN refused WRITE SAME with UNMAP once: zeroes go the allocated way
  // (WRITE SAME without UNMAP, or written) from then on.
  std::atomic<bool> unmap_refused_{false};
  common::SessionSet<Session> sessions_;
};

}  // namespace blockway::remote::iscsi
