// The file:// backend: a raw image file or a block device on this host.
//
//   file:///absolute/path   (file://localhost/absolute/path)
//
// It takes no options and no RetryLayer: there is no session to lose.
// Thread model: start-up and control plane only (see remote/backend.hpp).
#pragma once

#include "remote/backend.hpp"

namespace blockway::remote::file {

std::span<const core::OptionSpec> options();
void check(const std::string& uri, core::Options& options);
std::unique_ptr<core::BlockDevice> open(const std::string& uri, core::Options& options, const OpenEnv& env);

}  // namespace blockway::remote::file
