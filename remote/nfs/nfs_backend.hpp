// The nfs:// backend: an image file on an NFS server (v3 or v4), through
// libnfs.
//
//   nfs://SERVER[:PORT]/PATH/TO/IMAGE[?version=3|4]
//
// Options: connections=N (1..64, default one per event loop),
// io-timeout=SECONDS, keepalive=SECONDS (NFSv4 lease renewal while idle),
// inflight-kib=KIB. A RetryLayer goes above it.
// Thread model: start-up and control plane only (see remote/backend.hpp).
#pragma once

#include "remote/backend.hpp"

namespace blockway::remote::nfs {

// Its entry in the registry (remote/registry.cpp).
extern const Backend kBackend;

}  // namespace blockway::remote::nfs
