// The file:// backend: a raw image file or a block device on this host.
//
//   file:///absolute/path   (file://localhost/absolute/path)
//
// It takes no options and no RetryLayer: there is no session to lose.
// Thread model: start-up and control plane only (see remote/backend.hpp).
#pragma once

#include "remote/backend.hpp"

namespace blockway::remote::file {

// Its entry in the registry (remote/registry.cpp).
extern const Backend kBackend;

}  // namespace blockway::remote::file
