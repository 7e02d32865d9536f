// What every backend shares: BackendError, thrown when a backend cannot be
// used as configured (a URI it does not take, or a remote that refuses or is
// not there when the export opens).
//
// Thread model: none; start-up and control plane only.
#pragma once

#include "core/options.hpp"

namespace blockway::remote {

// A ConfigError: the daemon reports it like any configuration mistake
// (exit status 2 at start-up, an error answer to export-add).
struct BackendError : core::ConfigError {
  using core::ConfigError::ConfigError;
};

}  // namespace blockway::remote
