// ExportControl: what the control plane may ask of an export's cache at run
// time (prefetch, detach to local-only operation, write mode), and the report
// it reads for `blockway status` / `blockway stats`.
//
// Implemented by cache::CacheLayer; an Export without a cache has none. The
// interface lives in core/ so that the control plane does not depend on
// the cache's internals.
//
// Thread model: every method may be called from any thread (the control
// plane runs on an event loop); implementations synchronise internally.
// report() and the prefetch_* calls never block: they only change state that
// the background work reads.
#pragma once

#include "core/task.hpp"

#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>

namespace blockway::core {

enum class PrefetchState : uint8_t { idle, running, paused, done, failed };
enum class PrefetchOrder : uint8_t { sequential, hot_first };

[[nodiscard]] constexpr std::string_view to_string(PrefetchState s) noexcept {
  switch (s) {
    case PrefetchState::idle: return "idle";
    case PrefetchState::running: return "running";
    case PrefetchState::paused: return "paused";
    case PrefetchState::done: return "done";
    case PrefetchState::failed: return "failed";
  }
  return "unknown";
}
[[nodiscard]] constexpr std::string_view to_string(PrefetchOrder o) noexcept {
  return o == PrefetchOrder::hot_first ? "hot-first" : "sequential";
}

struct PrefetchStatus {
  PrefetchState state = PrefetchState::idle;
  PrefetchOrder order = PrefetchOrder::sequential;
  uint64_t total_bytes = 0;  // bytes the prefetch has to make present (remote holes excluded)
  uint64_t done_bytes = 0;   // of those, present now
  uint64_t rate_limit = 0;   // bytes per second; 0 = unlimited
  double rate = 0;           // bytes per second, averaged over the last few seconds
  double eta_seconds = -1;   // -1 = unknown
  std::string error;         // why it failed (state == failed), or why auto-detach waits (state == done)
};

struct CacheReport {
  std::string mode;  // writethrough | writeback | writeback-local | local (after detach)
  bool detached = false;
  std::string cache_path;
  uint64_t chunk_size = 0;
  uint64_t capacity = 0;  // 0 = the whole image
  uint64_t present_bytes = 0, dirty_bytes = 0;
  uint64_t hits = 0, misses = 0;
  uint64_t bytes_fetched = 0, bytes_written_back = 0;
  uint64_t fetch_errors = 0, writeback_errors = 0;
  uint64_t evicted_bytes = 0;
  uint64_t evictions = 0;         // chunks evicted (evicted_bytes / chunk size, but for a short last chunk)
  uint64_t file_bytes = 0;        // disk space the cache file takes now (allocated blocks)
  uint64_t failed_requests = 0;   // client requests this cache failed (each logged at warn with its reason)
  uint64_t lost_write_reports = 0;  // the remote lost acknowledged writes in a reconnect (flushes that said so)
  uint64_t replayed_chunks = 0;     // chunks the cache wrote to the remote again because of that
  bool recovered = false;  // the last start followed an unclean stop
  PrefetchStatus prefetch;
};

// The outcome of a control action: success, or an errno and a message for
// the operator ("12 chunks (768 KiB) are not present yet; run prefetch first").
struct ControlResult {
  std::error_code ec;
  std::string message;
  [[nodiscard]] bool ok() const noexcept { return !ec; }
};

class ExportControl {
 public:
  virtual ~ExportControl() = default;

  [[nodiscard]] virtual CacheReport report() const = 0;

  // Starts (or restarts after done/failed) the background copy of every
  // chunk not yet present. EALREADY if it is running; after detach, done.
  virtual ControlResult prefetch_start(PrefetchOrder order) = 0;
  virtual ControlResult prefetch_pause() = 0;
  virtual ControlResult prefetch_resume() = 0;
  // 0 = unlimited.
  virtual ControlResult prefetch_set_rate(uint64_t bytes_per_second) = 0;

  // Switches the export to local-only operation: the remote is closed and
  // never contacted again, and the state persists across restarts. Refused
  // (EBUSY, with a message) while chunks are missing, even with force; while
  // chunks are dirty it is refused without force, and with force it waits
  // for their write-back first.
  virtual Task<ControlResult> detach(bool force) = 0;

  // "writethrough" | "writeback" | "writeback-local"; EINVAL for anything
  // else, and refused after detach. Switching away from a write-back mode
  // writes back dirty data first where the new mode requires it.
  virtual Task<ControlResult> set_mode(std::string_view mode) = 0;
};

}  // namespace blockway::core
