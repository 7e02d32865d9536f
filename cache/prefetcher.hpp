// Prefetcher: the background copy of every chunk of an export that is not
// present yet, from the remote into its cache, ending (optionally) in detach.
//
// It only schedules: the fills themselves go through the cache layer's
// single-flight claim machinery (CacheLayer::prefetch_fill), so a chunk is
// never fetched twice and never races with a client's write. What it adds:
//   - order: sequential, or hot-first (the chunks clients read first in
//     earlier sessions, newest session first, then the rest sequentially);
//   - merging: neighbouring absent chunks go to the remote as one read of up
//     to kRunBytes or the remote's preferred block (an RBD object), whichever
//     is larger, at most kMaxRunBytes (kBusyRunBytes while clients are active);
//   - yielding: up to kMaxInFlight runs in flight when the export is idle,
//     one small run while client requests are in progress or just ended;
//   - an optional rate limit (token bucket, bytes/s), pause/resume;
//   - holes: chunks the remote's block status reports as reading zero are
//     not copied, only zeroed in the cache file and marked present;
//   - persistence: whether it runs (and paused/rate) is kept in the
//     catalogue, so it continues after a restart from the present bitmap;
//   - auto-detach after a complete copy: retried with back-off while refused
//     (the reason is the status's error, with state done); chunks that went
//     missing after the copy (a writethrough trim) are fetched again by a new
//     copy loop, which then detaches.
//
// Thread model: the control calls (start/pause/resume/set_rate/status) may
// come from any thread; they take mutex_ briefly and never block. The copy
// loop and its fills run on the cache layer's background executor (one
// thread); catalogue writes go to the blocking pool, serialised by
// persist_mutex_.
#pragma once

#include "core/export_control.hpp"
#include "core/shared_event.hpp"
#include "core/task.hpp"

#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace blockway::cache {

class CacheLayer;

class Prefetcher {
 public:
  static constexpr uint64_t kRunBytes = 1u << 20;
  static constexpr uint64_t kMaxRunBytes = 8u << 20;  // bounds kMaxInFlight runs of a large preferred block
  static constexpr uint64_t kBusyRunBytes = 256u << 10;
  static constexpr int kMaxInFlight = 16;
  // Client requests that ended less than this long ago count as activity.
  static constexpr std::chrono::milliseconds kQuietAfter{5};

  explicit Prefetcher(CacheLayer& cache);
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // Called once the layer is started: resumes a prefetch persisted as
  // running, or starts the configured one.
  void start_at_boot();

  core::ControlResult start(core::PrefetchOrder order, bool paused = false);
  core::ControlResult pause();
  core::ControlResult resume();
  core::ControlResult set_rate(uint64_t bytes_per_second);
  [[nodiscard]] core::PrefetchStatus status() const;
  // After detach: nothing is left to do.
  void mark_done();

  // Stops the loop and waits for its fills (close / abandon).
  core::Task<void> stop();
  // Prefetch fills in flight (detach waits for none).
  [[nodiscard]] int in_flight() const noexcept { return in_flight_.load(); }

 private:
  core::Task<void> run(core::PrefetchOrder order);
  core::Task<void> scan_holes();
  core::Task<void> sleep_for(std::chrono::microseconds d);
  core::Task<std::error_code> fill(uint64_t first, uint64_t last);
  std::vector<uint64_t> hot_order() const;
  [[nodiscard]] bool foreground_busy() const noexcept;
  void sample_rate();
  // Writes the wanted state (prefetch / prefetch-paused / prefetch-rate) to
  // the catalogue on the blocking pool.
  void persist();
  void set_state(core::PrefetchState s, std::string error = {});
  // Why auto-detach has not happened yet, shown as the status's error while
  // the state is done.
  void note_auto_detach(std::string why);

  CacheLayer& c_;
  mutable std::mutex mutex_;
  core::PrefetchState state_ = core::PrefetchState::idle;
  core::PrefetchOrder order_ = core::PrefetchOrder::sequential;
  std::string error_;
  std::string persisted_;  // what the catalogue should say under "prefetch"
  std::deque<std::pair<std::chrono::steady_clock::time_point, uint64_t>> samples_;

  std::atomic<uint64_t> rate_limit_{0};
  std::atomic<bool> paused_{false};
  std::atomic<bool> stop_{false};
  std::atomic<int> loops_{0};       // copy loops running (a new start may overlap an old loop's end)
  std::atomic<int> in_flight_{0};
  std::atomic<int> failures_{0};    // consecutive failed runs
  std::string last_error_;          // under mutex_
  std::atomic<uint64_t> copied_{0};  // data bytes fetched by prefetch runs
  // Auto-detach: copy loops restarted because chunks went missing after a
  // completed prefetch (back-off between them); 0 after a detach.
  std::atomic<int> refetches_{0};

  // Catalogue writes run on the blocking pool, one at a time, newest wins.
  struct PersistQueue {
    std::mutex mutex;
    uint64_t applied = 0;
    // Writes posted and not yet run: stop() waits for them, so a state set
    // just before a close (a pause) is in the catalogue when the cache reopens.
    std::atomic<uint32_t> pending{0};
  };
  std::shared_ptr<PersistQueue> persist_queue_ = std::make_shared<PersistQueue>();
  std::atomic<uint64_t> persist_seq_{0};
};

}  // namespace blockway::cache
