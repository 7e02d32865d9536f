// AoeAddress: what an aoe://IFACE/SHELF.SLOT URI names, and the aoe://
// export options (read by aoe_backend.cpp), validated without touching the
// network.
//
// Pure functions, no threads. Errors are BackendError (remote/registry.hpp)
// with a message that quotes the URI and says what is accepted.
#pragma once

#include "remote/uri.hpp"

#include <chrono>
#include <cstdint>
#include <string>

namespace blockway::remote::aoe {

inline constexpr unsigned kMaxShelf = 65534;  // 65535 is the broadcast shelf
inline constexpr unsigned kMaxSlot = 254;     // 255 is the broadcast slot

struct AoeAddress {
  std::string interface;
  uint16_t shelf = 0;
  uint8_t slot = 0;
  friend bool operator==(const AoeAddress&, const AoeAddress&) = default;
};

struct AoeOptions {
  // A frame unanswered (after retransmissions) this long drops the session:
  // its requests fail with ETIMEDOUT and RetryLayer rediscovers the target.
  std::chrono::milliseconds io_timeout{15000};
  // How long start-up waits for the target to answer discovery.
  std::chrono::milliseconds discover_timeout{5000};
};

// Linux's rule for interface names (dev_valid_name): 1 to 15 bytes, not "."
// or "..", no '/', ':' or white space.
[[nodiscard]] bool valid_interface_name(const std::string& name) noexcept;

// `text` is the URI as the user wrote it, for messages.
[[nodiscard]] AoeAddress parse_address(const Uri& uri, const std::string& text);

}  // namespace blockway::remote::aoe
