// The aoe:// entry of the backend registry: check without touching the
// network, open by discovering the target.
//
// Thread model: start-up / control plane only (may block for discovery).
#pragma once

#include "remote/registry.hpp"
#include "remote/uri.hpp"

namespace blockway::remote::aoe {

void check_backend(const Uri& uri, const OpenRequest& req);
std::unique_ptr<core::BlockDevice> open_backend(const Uri& uri, const OpenRequest& req);

}  // namespace blockway::remote::aoe
