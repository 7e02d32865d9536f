// The aoe:// backend: a disk on an ATA-over-Ethernet target, reached by
// blockway's own initiator (aoe_device.hpp).
//
//   aoe://IFACE/SHELF.SLOT
//
// Options: io-timeout=SECONDS (default 15), discover-timeout=SECONDS (how
// long start-up waits for the target to answer, default 5). A RetryLayer
// goes above it; its reconnect is a rediscovery.
// Thread model: start-up and control plane only (see remote/backend.hpp).
#pragma once

#include "remote/aoe/aoe_address.hpp"
#include "remote/backend.hpp"

namespace blockway::remote::aoe {

// Its entry in the registry (remote/registry.cpp).
extern const Backend kBackend;

// Takes this backend's options (for tests). Throws core::ConfigError.
AoeOptions take_options(core::Options& options);

}  // namespace blockway::remote::aoe
