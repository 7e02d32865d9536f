// CacheLayer: the background loop (timed checkpoints, flushes, eviction) and
// eviction (CLOCK) with punching of evicted chunks out of the cache file.
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include "cache/prefetcher.hpp"

#include "core/logging.hpp"
#include "core/remote_device.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <optional>

namespace blockway::cache {

// ---- background work ----

void CacheLayer::start() {
  background_done_ = std::make_shared<core::SharedEvent>();
  boost::asio::co_spawn(background_, background_loop(), [done = background_done_](std::exception_ptr) { done->set(); });
  prefetcher_->start_at_boot();
}

Task<void> CacheLayer::background_loop() {
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  auto last_checkpoint = std::chrono::steady_clock::now();
  auto backoff = std::chrono::milliseconds(100);
  std::optional<std::chrono::steady_clock::time_point> dirty_since;
  const uint64_t cache_chunks = capacity_chunks_ ? capacity_chunks_ : chunk_count();
  while (!stopping_.load()) {
    timer.expires_after(std::chrono::milliseconds(100));
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    if (stopping_.load()) break;
    // Local mode: the cache file is the image; nothing to write back, evict
    // or checkpoint (flushes sync it).
    if (local_.load(std::memory_order_acquire)) continue;
    // Dirty chunks are written back in every mode (writethrough can inherit
    // them from an earlier run in a write-back mode), once they have waited
    // writeback-delay, or at once when they fill 90% of a limited cache (dirty
    // chunks cannot be evicted).
    const auto now = std::chrono::steady_clock::now();
    if (dirty_.find_set(0) < nchunks_) {
      if (!dirty_since) dirty_since = now;
      if (now - *dirty_since >= cfg_.writeback_delay || (capacity_chunks_ && dirty_.count() * 10 >= cache_chunks * 9)) {
        if (auto ec = co_await write_back(0, nchunks_ - 1)) {
          // The remote is in trouble: try again later, less often.
          timer.expires_after(backoff);
          co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
          backoff = std::min(backoff * 2, std::chrono::milliseconds(10000));
        } else {
          backoff = std::chrono::milliseconds(100);
        }
        dirty_since.reset();
      }
    } else {
      dirty_since.reset();
    }
    // Chunks written to the remote stay pinned until a remote flush covers
    // them: with a capacity and clients that never flush, flush the remote
    // now and then so that they can be evicted. A flush that finds lost
    // writes has marked them dirty: write them back at once.
    if (capacity_chunks_ && remote_caps_.flush == Support::native && remote_flush_owed() &&
        std::chrono::steady_clock::now().time_since_epoch().count() -
                last_remote_flush_.load(std::memory_order_relaxed) >=
            std::chrono::nanoseconds(kPinnedFlushInterval).count()) {
      if (co_await flush_remote() == core::writes_lost_error()) (void)co_await write_back(0, nchunks_ - 1);
    }
    if (capacity_chunks_ && present_.count() > capacity_chunks_)
      co_await evict();
    else if (!unpunched_.empty())
      co_await punch_evicted({});
    if (std::chrono::steady_clock::now() - last_checkpoint >= cfg_.checkpoint_interval) {
      last_checkpoint = std::chrono::steady_clock::now();
      if (auto ec = co_await checkpoint(true)) log_->warn("export '{}': checkpoint failed: {}", name_, ec.message());
    }
  }
}

Task<void> CacheLayer::evict() {
  const uint64_t present = present_.count();
  const uint64_t target = capacity_chunks_ - capacity_chunks_ / 10;
  if (present <= target || nchunks_ == 0) co_return;
  const uint64_t want = std::min<uint64_t>(present - target, 16384);
  auto fill = std::make_shared<Fill>();
  std::vector<uint64_t> victims;
  // CLOCK: a referenced chunk gets a second chance; dirty or claimed chunks
  // are skipped. A victim is claimed (no fill can start there) and its present
  // bit cleared at once, so new readers fetch it again after the eviction.
  for (uint64_t steps = 0; steps < 2 * nchunks_ && victims.size() < want; ++steps) {
    const uint64_t c = clock_hand_;
    clock_hand_ = (clock_hand_ + 1) % nchunks_;
    if (!present_.test(c) || dirty_.test(c) || cleaning_.test(c) || pinned(c)) continue;
    if (referenced_.clear(c)) continue;
    auto& s = shard(c);
    std::lock_guard lock(s.mutex);
    // (pinned again under the shard lock: a writer notes its chunks before
    // it releases their claim, which takes this lock)
    if (s.fills.contains(c) || dirty_.test(c) || pinned(c)) continue;
    s.fills.emplace(c, fill);
    present_.clear(c);
    victims.push_back(c);
  }
  if (victims.empty()) {
    fill->done.set();
    co_return;
  }
  std::sort(victims.begin(), victims.end());
  // Grace period: requests that saw these chunks present finish first.
  const uint32_t old_epoch = epoch_.fetch_xor(1, std::memory_order_seq_cst);
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  while (epoch_active_[old_epoch].load(std::memory_order_seq_cst) > 0) {
    timer.expires_after(std::chrono::milliseconds(1));
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
  }
  // A write that began before the present bit was cleared made the chunk
  // dirty: it stays.
  std::vector<uint64_t> gone;
  for (uint64_t c : victims) {
    if (dirty_.test(c) || cleaning_.test(c))
      present_.set(c);
    else
      gone.push_back(c);
  }
  // Readers of the victims may fetch them again from now on: the claims are
  // held only across the grace period, not across the catalogue commit and
  // the punching below (a random reader used to wait behind a whole pass,
  // hundreds of milliseconds).
  release(fill, victims, {});
  uint64_t bytes = 0;
  for (uint64_t c : gone) bytes += chunk_len(c);
  evicted_.fetch_add(bytes, std::memory_order_relaxed);
  evictions_.fetch_add(gone.size(), std::memory_order_relaxed);
  co_await punch_evicted(std::move(gone));
}

Task<void> CacheLayer::punch_evicted(std::vector<uint64_t> gone) {
  // Chunks an earlier pass could not punch (claimed at that moment) are
  // tried again with these.
  gone.insert(gone.end(), unpunched_.begin(), unpunched_.end());
  unpunched_.clear();
  std::sort(gone.begin(), gone.end());
  gone.erase(std::unique(gone.begin(), gone.end()), gone.end());
  unpunched_ = co_await punch_absent(std::move(gone));
}

Task<std::vector<uint64_t>> CacheLayer::punch_absent(std::vector<uint64_t> gone) {
  // The cleared present bits are persisted before the bytes go, so a crash
  // in between never finds a "present" chunk full of zeroes. Clearing a bit
  // needs no fdatasync of the cache file (only setting one does), so this is
  // a catalogue commit of the present pages alone. Under checkpoint_mutex_,
  // saved_present_ is what the catalogue holds: a chunk is punched only while
  // it is absent in memory and in the catalogue, and claimed (no fill can be
  // writing it). A chunk fetched again meanwhile is left alone.
  // The lock is let go every kPunchBatch runs so that a FLUSH's checkpoint
  // does not wait for the whole pass; a checkpoint in between snapshots the
  // chunks still to punch as absent (they are, or they are skipped).
  constexpr int kPunchBatch = 32;
  std::optional<core::AsyncMutex::Guard> guard(co_await checkpoint_mutex_.lock());
  std::vector<uint64_t> now = saved_present_;
  for (uint64_t c : gone)
    if (!present_.test(c)) now[c / 64] &= ~(uint64_t{1} << (c % 64));
  std::vector<MetaStore::PageWrite> pages;
  add_changed_pages(BitmapKind::present, now, saved_present_, pages);
  if (!pages.empty()) {
    // (nothing is punched if this fails: the bytes stay valid for the
    // catalogue's present bits)
    if (co_await commit_pages(pages, {})) co_return gone;
    saved_present_ = std::move(now);
  }
  std::vector<uint64_t> later;  // absent, but claimed or not persisted absent yet: try again
  auto fill = std::make_shared<Fill>();
  for (size_t i = 0, runs = 0; i < gone.size(); ++runs) {
    if (runs % kPunchBatch == kPunchBatch - 1) {
      guard.reset();
      guard.emplace(co_await checkpoint_mutex_.lock());
    }
    // A run of consecutive chunks that are absent, persisted absent and
    // unclaimed, claimed for the punch.
    std::vector<uint64_t> run;
    for (; i < gone.size(); ++i) {
      const uint64_t c = gone[i];
      if (!run.empty() && c != run.back() + 1) break;
      if (present_.test(c)) continue;  // fetched again: its bytes are valid
      auto& sh = shard(c);
      std::lock_guard lock(sh.mutex);
      if (((saved_present_[c / 64] >> (c % 64)) & 1) || sh.fills.contains(c) || present_.test(c)) {
        if (!present_.test(c)) later.push_back(c);
        continue;
      }
      sh.fills.emplace(c, fill);
      run.push_back(c);
    }
    if (run.empty()) continue;
    const uint64_t off = chunk_start(run.front());
    const uint64_t len = chunk_start(run.back()) + chunk_len(run.back()) - off;
    if (auto ec = co_await cache_file_->trim({off, len}, 0))
      log_->debug("export '{}': punching evicted chunks failed: {}", name_, ec.message());
    for (uint64_t c : run) {
      auto& sh = shard(c);
      std::lock_guard lock(sh.mutex);
      sh.fills.erase(c);
    }
    // Wake whoever waited on one of these chunks, and start a new fill for
    // the next run (its waiters must not be woken by this one).
    fill->done.set();
    fill = std::make_shared<Fill>();
  }
  fill->done.set();
  co_return later;
}

}  // namespace blockway::cache
