// CacheConfig: the per-export cache settings, parsed from the export's
// options (TOML keys or "--export NAME=URI,cache=DIR,mode=...").
//
// Start-up only; no threads.
#pragma once

#include "core/export_control.hpp"
#include "core/options.hpp"

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace blockway::cache {

enum class WriteMode { writethrough, writeback, writeback_local };

std::string to_string(WriteMode mode);

struct CacheConfig {
  std::string dir;  // where the cache file lives
  WriteMode mode = WriteMode::writethrough;
  uint64_t chunk_size = 64u << 10;
  bool preallocate = false;
  uint64_t capacity = 0;              // bytes of present chunks to keep; 0 = the whole image
  uint32_t readahead_chunks = 16;     // fetched ahead of a sequential miss
  std::chrono::milliseconds checkpoint_interval{2000};
  // Background write-back waits this long after data became dirty, so that
  // repeated writes to a chunk go to the remote once (0: at once). It starts
  // sooner when dirty data fills 90% of a cache with a capacity.
  std::chrono::milliseconds writeback_delay{5000};
  // prefetch=sequential|hot-first starts the background copy of the whole
  // image at start-up (off: only on request); prefetch-rate limits it
  // (bytes/s, 0 = unlimited); auto-detach=on switches to local mode once
  // every chunk is present.
  bool prefetch_auto = false;
  core::PrefetchOrder prefetch_order = core::PrefetchOrder::sequential;
  uint64_t prefetch_rate = 0;
  bool auto_detach = false;

  // Takes the cache options from an export's options. Returns nullopt when
  // the export has no cache (no "cache" option; then any other cache option
  // is an error). Throws core::ConfigError naming the option on a bad value.
  static std::optional<CacheConfig> take_from(core::Options& options);
  // Every cache option, for --help.
  static std::span<const core::OptionSpec> options();
};

}  // namespace blockway::cache
