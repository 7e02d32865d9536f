// Helpers shared by the OverlayLayer's source files (overlay_layer.cpp,
// overlay_snapshots.cpp); not part of the layer's interface.
#pragma once

#include "core/export_control.hpp"

#include <algorithm>
#include <cctype>
#include <string>
#include <vector>

namespace blockway::cache::overlay_internal {

// The snapshot names of a chain, as the catalogue keeps them (one per line).
inline std::string join_names(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : "\n") + n;
  return out;
}

inline bool valid_snapshot_name(const std::string& n) {
  if (n.empty() || n.size() > 64 || n[0] == '.') return false;
  return std::all_of(n.begin(), n.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

inline core::ControlResult failure(int err, std::string message) { return {core::errno_code(err), std::move(message)}; }

}  // namespace blockway::cache::overlay_internal
