// Discovery: opens the AF_PACKET socket on the interface, finds the target
// with a broadcast Query Config for SHELF.SLOT, and asks it ATA IDENTIFY
// DEVICE for its size and command set. Blocking (poll with a deadline): runs
// at start-up and, for RetryLayer's reconnect(), on the blocking pool. The
// socket it opened is handed to the session, which keeps it.
//
// Thread model: no shared state; each call owns its socket.
#pragma once

#include "remote/aoe/aoe_address.hpp"
#include "remote/aoe/aoe_protocol.hpp"

#include <chrono>
#include <string>

namespace blockway::remote::aoe {

// Owns one file descriptor.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  [[nodiscard]] int get() const noexcept { return fd_; }
  int release() noexcept {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

// A packet socket bound to one interface and ethertype 0x88A2.
struct PacketSocket {
  UniqueFd fd;
  int ifindex = 0;
  unsigned mtu = 0;
};

// What discovery learned about the target.
struct TargetInfo {
  Mac mac{};
  ConfigArgs config;          // buffer count, firmware, sector limit
  IdentifyInfo identify;
  unsigned sectors_per_frame = 0;  // from the config answer and the MTU
  uint8_t flush_command = kAtaFlushCache;
};

struct DiscoverResult {
  PacketSocket socket;
  TargetInfo target;
  int err = 0;               // errno; 0 on success
  std::string message;       // what went wrong, for the user
};

// The message for EPERM/EACCES from socket(AF_PACKET): blockwayd lacks CAP_NET_RAW.
[[nodiscard]] std::string missing_capability_message(const std::string& interface);

// Opens and binds the socket. err/message set on failure.
[[nodiscard]] DiscoverResult open_packet_socket(const AoeAddress& address);
// Sends one datagram to `dst` on the socket's interface. Returns 0 or errno.
int send_frame(const PacketSocket& s, const Mac& dst, std::span<const std::byte> frame) noexcept;

// Opens the socket, finds the target and identifies it, all within `timeout`.
[[nodiscard]] DiscoverResult discover(const AoeAddress& address, std::chrono::milliseconds timeout);

}  // namespace blockway::remote::aoe
