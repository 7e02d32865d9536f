// The rbd:// backend's registry entry (remote/registry.cpp).
//
// Thread model: start-up and control plane only (see remote/backend.hpp).
#pragma once

#include "remote/backend.hpp"

namespace blockway::remote::rbd {
extern const Backend kBackend;
}
