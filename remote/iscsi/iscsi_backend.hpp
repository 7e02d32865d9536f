// The iscsi:// backend: one LUN of an iSCSI target, through libiscsi.
//
//   iscsi://[USER%PASSWORD@]HOST[:PORT]/TARGET-IQN/LUN
//
// Options: sessions=N (1..64, default one per event loop),
// io-timeout=SECONDS, initiator=IQN (the initiator name to log in with),
// inflight-kib=KIB. A RetryLayer goes above it.
// Thread model: start-up and control plane only (see remote/backend.hpp).
#pragma once

#include "remote/backend.hpp"
#include "remote/iscsi/iscsi_device.hpp"

namespace blockway::remote::iscsi {

// Its entry in the registry (remote/registry.cpp).
extern const Backend kBackend;

// Takes this backend's options (for tests). Throws core::ConfigError.
IscsiOptions take_options(core::Options& options);

}  // namespace blockway::remote::iscsi
