// The registry of backends: the one table (registry.cpp) that says which
// backend opens which URI scheme, with its URI forms, its options and whether
// a RetryLayer goes above it. Validation, opening and --help all read it.
//
// Thread model: start-up and control plane only; the table is immutable.
#pragma once

#include "remote/backend.hpp"

#include <string>
#include <vector>

namespace blockway::remote {

// Every backend, in the order --help lists them.
const std::vector<Backend>& backends();
// The backend for `uri`'s scheme. Throws BackendError naming the URI and the
// schemes there are.
const Backend& backend_for(const std::string& uri);
// backend_for(uri).check(uri, options): validates without touching the remote.
void check(const std::string& uri, core::Options& options);
// Every scheme of every backend, for messages and --help.
std::vector<std::string> supported_schemes();

}  // namespace blockway::remote
