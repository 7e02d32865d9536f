// OverlayConfig: the settings of a clone's overlay, parsed from the export's
// options ("--export vm1=clone:golden,overlay=DIR,granularity=16k").
//
// Start-up only; no threads.
#pragma once

#include "core/options.hpp"

#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace blockway::cache {

// "clone:golden" -> "golden"; nullopt for any other URI.
std::optional<std::string> clone_base_of(const std::string& uri);

struct OverlayConfig {
  std::string dir;                  // where the overlay file lives (absolute)
  uint64_t granularity = 64u << 10;  // overlay block: copy-up unit, one allocation bit

  // Takes the overlay options of a clone export. `default_dir` is used when
  // the options give no overlay directory. Throws core::ConfigError naming the
  // option on a bad value.
  static OverlayConfig take_from(core::Options& options, const std::string& default_dir);
  // Whether any overlay option is given (an error on an export that is not a clone).
  static bool given(const core::Options& options);
  // Every overlay option, for --help.
  static std::span<const core::OptionSpec> options();
};

}  // namespace blockway::cache
