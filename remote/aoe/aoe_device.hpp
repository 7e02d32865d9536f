// AoeDevice: a disk on an ATA-over-Ethernet target (vblade, Coraid shelves),
// reached by blockway's own initiator: aoe://IFACE/SHELF.SLOT.
//
// Start-up: discovery (aoe_discovery.hpp) opens an AF_PACKET socket on IFACE
// for ethertype 0x88A2, broadcasts Query Config for SHELF.SLOT, remembers the
// answering target's MAC, buffer count and sector limit, and reads its size
// and LBA48/flush support from ATA IDENTIFY DEVICE. A missing interface, no
// answer, or a missing CAP_NET_RAW stop the daemon with a clear message.
//
// Data path: READ/WRITE SECTORS (EXT) frames carrying as many sectors as the
// target and the MTU allow; a request larger than one frame is split. A tag
// table (one slot per frame the target buffers) keeps up to buffer-count
// frames outstanding; requests beyond that queue in arrival order. FLUSH
// CACHE (EXT when the target offers it) for flush; FUA is emulated above as
// write + flush (CheckedDevice). Writes go out with sendmmsg straight from
// the caller's buffer; read data is copied once from the receive buffer.
// Answers are accepted only from the target's MAC, for our shelf.slot, with
// the response flag and a tag in flight; anything else (short, malformed,
// foreign, duplicate or late) is dropped and counted. An AoE error or an ATA
// status with ERR/DF fails the request with EIO.
//
// Loss: a frame unanswered after the retransmission timeout (SRTT/RTTVAR as
// in TCP, rtt_estimator.hpp, doubling per retry) is sent again with the same
// tag; if it is still unanswered io-timeout after its first send, the session
// is dropped: every request in flight fails with ETIMEDOUT and later ones
// with ENOTCONN until reconnect(), which rediscovers the target on the
// blocking pool and installs the new socket (generation() counts them).
// Caveat: a duplicate of a retransmitted write that the network delays past
// a later write of the same sectors could overwrite it; AoE has no sequence
// numbers, the same holds for Linux's aoe driver.
//
// Thread model: one session, confined to one event loop (the socket, the tag
// table, the queue and the timer are touched only there); requests from
// other loops hop there and back (co_spawn). connected(), generation() and
// the counters are atomics. The device must be destroyed after the loops
// stopped running (as the daemon does).
#pragma once

#include "core/event_loops.hpp"
#include "core/remote_device.hpp"
#include "remote/aoe/aoe_address.hpp"

#include <atomic>
#include <memory>
#include <string>

namespace blockway::remote::aoe {

struct AoeStats {
  uint64_t frames_sent = 0;
  uint64_t retransmits = 0;
  uint64_t answers = 0;        // accepted answers
  uint64_t short_frames = 0;   // shorter than the headers they need
  uint64_t malformed = 0;      // wrong version, truncated data, bad size
  uint64_t foreign = 0;        // other MAC, other shelf.slot, not a response
  uint64_t stale = 0;          // unknown tag: duplicate, late or not ours
  uint64_t errors = 0;         // AoE error flag or ATA ERR/DF
  uint64_t timeouts = 0;       // sessions dropped after io-timeout
  [[nodiscard]] uint64_t ignored() const noexcept { return short_frames + malformed + foreign + stale; }
};

class AoeDevice final : public core::RemoteDevice {
 public:
  // Discovers the target synchronously. Throws BackendError naming the URI.
  AoeDevice(std::string uri, AoeAddress address, AoeOptions options, bool read_only, core::EventLoops& loops);
  ~AoeDevice() override;
  AoeDevice(const AoeDevice&) = delete;
  AoeDevice& operator=(const AoeDevice&) = delete;

  [[nodiscard]] core::Geometry geometry() const noexcept override { return geometry_; }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override { return caps_; }
  [[nodiscard]] std::string describe() const override { return "aoe:" + uri_; }

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset,
                                       core::IoFlags flags) override;
  core::Task<std::error_code> flush() override;

  core::Task<std::error_code> reconnect() override;
  [[nodiscard]] bool connected() const noexcept override;
  [[nodiscard]] uint64_t generation() const noexcept override {
    return generation_.load(std::memory_order_acquire);
  }

  [[nodiscard]] AoeStats stats() const noexcept;

  class Session;
  struct Op;

 private:
  core::Task<std::error_code> submit(Op op);

  std::string uri_;
  AoeAddress address_;
  AoeOptions options_;
  core::EventLoops& loops_;
  core::Geometry geometry_;
  core::Capabilities caps_;
  std::shared_ptr<Session> session_;
  std::atomic<uint64_t> generation_{1};
};

}  // namespace blockway::remote::aoe
