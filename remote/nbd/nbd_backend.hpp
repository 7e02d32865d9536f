// The nbd:// backend: an export of another NBD server, through libnbd.
//
//   nbd://HOST[:PORT]/EXPORT
//   nbd+unix:///EXPORT?socket=/path/to/socket
//
// Options: connections=N (1..64; default one per event loop when the server
// offers multi-conn, else 1), io-timeout=SECONDS. A RetryLayer goes above it.
// Thread model: start-up and control plane only (see remote/backend.hpp).
#pragma once

#include "remote/backend.hpp"

namespace blockway::remote::nbd {

// Its entry in the registry (remote/registry.cpp).
extern const Backend kBackend;

}  // namespace blockway::remote::nbd
