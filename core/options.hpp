// Options: the one reader of settings given as text (export options, FUSE
// options, command-line flags, TOML values): sizes, booleans, and the
// ConfigError every mistake in them becomes.
//
// Start-up and control plane only; pure functions, no threads.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string_view>

namespace blockway::core {

// A configuration mistake, with a message that names the setting. Thrown at
// start-up (the daemon exits with status 2) and by the control plane.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Parses "64k", "32M", "1G", "4096" (binary units). Throws ConfigError naming `what`.
uint64_t parse_size(std::string_view text, std::string_view what);
bool parse_bool(std::string_view text, std::string_view what);

}  // namespace blockway::core
