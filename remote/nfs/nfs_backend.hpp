// The nfs:// entry of the backend registry (registry.cpp): option parsing,
// validation without connecting, and opening.
//
// Thread model: start-up and control plane only, like the registry.
#pragma once

#include "remote/registry.hpp"
#include "remote/uri.hpp"

namespace blockway::remote::nfs {

// Checks the URI and the options (connections, io-timeout, keepalive) without touching
// the network. Throws BackendError.
void check_nfs(const Uri& uri, const OpenRequest& request);
// Mounts and opens; erases the options it used. Throws BackendError.
std::unique_ptr<core::BlockDevice> open_nfs(const Uri& uri, const OpenRequest& request);

}  // namespace blockway::remote::nfs
