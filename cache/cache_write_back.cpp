// CacheLayer: writing dirty chunks back to the remote, and the accounting
// of remote writes until a remote flush covers them (replay after the remote
// lost acknowledged writes).
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include "core/buffer_pool.hpp"
#include "core/logging.hpp"
#include "core/remote_device.hpp"

#include <boost/asio/co_spawn.hpp>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <span>

namespace blockway::cache {

// ---- write-back ----------------------------------------------------------------

namespace {

// len bytes of zeroes (len <= kMaxRun), never written: sending them costs no
// buffer and no memset, and their pages stay shared.
std::span<const std::byte> zero_run(uint64_t len) noexcept {
  alignas(4096) static const std::byte zeroes[kMaxRun] = {};
  return {zeroes, static_cast<size_t>(std::min<uint64_t>(len, kMaxRun))};
}

}  // namespace

Task<std::error_code> CacheLayer::write_back(uint64_t first, uint64_t last) {
  auto guard = co_await writeback_mutex_.lock();
  co_return co_await write_back_locked(first, last);
}

Task<std::error_code> CacheLayer::write_back_durably(uint64_t first, uint64_t last) {
  {
    auto guard = co_await writeback_mutex_.lock();
    if (auto ec = co_await write_back_locked(first, last)) co_return ec;
  }
  // A chunk cleaned (by this pass or an earlier one) whose dirty bit is still
  // persisted would, after a power loss that reverts the cache file, be
  // written back again with older bytes over the ones flushed to the remote.
  // Then sync the cache file and persist the clean bits before answering.
  for (uint64_t c = dirty_persisted_.find_set(first); c <= last && c < nchunks_; c = dirty_persisted_.find_set(c + 1))
    if (!dirty_.test(c) && !cleaning_.test(c)) co_return co_await checkpoint(true);
  co_return std::error_code{};
}

Task<std::error_code> CacheLayer::write_back_run(uint64_t a, uint64_t b) {
  mark_remote_written(a, b);
  // Hold the chunks while their bytes go from the cache file to the remote:
  // a writethrough write (or zero/trim) holds them too, from its remote write
  // to its cache write. Without this, a write-back could read the old bytes
  // before such a write and store them at the remote after it: the remote
  // would keep stale data and the chunk would be marked clean. Write-back
  // modes need no claim (their writes set dirty again after the cache
  // write), but taking it costs a map insert per chunk next to a remote write.
  auto [fill, mine] = co_await claim(a, b, true);
  const uint64_t off = chunk_start(a);
  const uint64_t len = chunk_start(b) + chunk_len(b) - off;
  const uint64_t begun = remote_write_begin();
  // A run that is a hole of the cache file (trimmed or zeroed: mkfs's
  // discard of the whole image makes every chunk one) reads as zeroes
  // without reading it: reading it would have the kernel's read-ahead
  // allocate and memset page-cache folios on this loop thread (up to tens of
  // ms per MiB, RWF_NOWAIT succeeds on holes), which stalled every client
  // request meanwhile and filled the page cache with zeroes. SEEK_DATA never
  // calls data a hole (delayed-allocation pages count as data); a write
  // landing after the look sets dirty again after its cache write, as with a
  // read, so the chunk is written back once more.
  std::error_code ec;
  core::ExtentList extents;
  const bool hole = !co_await cache_file_->block_status({off, len}, extents) && extents.size() == 1 &&
                    extents[0].length >= len && (extents[0].flags & core::kExtentZero);
  core::IoBuffer buf;
  std::span<const std::byte> data;
  if (hole && len <= kMaxRun) {
    data = zero_run(len);  // no buffer, no memset
  } else {
    buf = core::IoBuffer(len);
    if (hole)
      std::memset(buf.data(), 0, len);  // a chunk larger than kMaxRun
    else
      ec = co_await cache_file_->read(buf.span(), off, 0);
    data = buf.span();
  }
  if (!ec) {
    if (remote_caps_.zero == Support::native && (hole || all_zero(data.data(), len))) {
      ec = co_await next().zero({off, len}, 0);  // keeps the remote sparse
      if (ec == std::errc::not_supported || ec == std::errc::operation_not_supported)
        ec = co_await next().write(data, off, 0);
    } else {
      ec = co_await next().write(data, off, 0);
    }
  }
  remote_write_done(0, ec);
  remote_write_end(a, b, begun, true, ec, false);
  release(fill, mine, ec);
  if (!ec) written_back_.fetch_add(len, std::memory_order_relaxed);
  co_return ec;
}

Task<std::error_code> CacheLayer::write_back_locked(uint64_t first, uint64_t last) {
  // Up to kWriteBackWindow runs of up to kMaxRun bytes are in flight at once:
  // a remote with latency is kept busy, and memory stays bounded.
  constexpr size_t kWriteBackWindow = 8;
  std::vector<std::pair<uint64_t, uint64_t>> cleaned;
  std::error_code ec;
  const uint64_t max_chunks = std::max<uint64_t>(1, std::min<uint64_t>(kMaxRun, geometry_.max_transfer) >> chunk_shift_);
  auto redirty = [&](uint64_t a, uint64_t b) {
    for (uint64_t c = a; c <= b; ++c) {
      dirty_.set(c);
      cleaning_.clear(c);
    }
  };
  auto ex = co_await boost::asio::this_coro::executor;
  uint64_t c = dirty_.find_set(first);
  while (c <= last && c < nchunks_ && !ec) {
    // Take up to a window of runs of consecutive dirty chunks. "cleaning" is
    // set before "dirty" is cleared, so a checkpoint never sees a chunk as
    // clean while its data is not on the remote yet; a write meanwhile sets
    // dirty again and the chunk is written back once more.
    std::vector<std::pair<uint64_t, uint64_t>> window;
    while (window.size() < kWriteBackWindow && c <= last && c < nchunks_) {
      const uint64_t a = c;
      uint64_t b = c;
      while (b <= last && b < nchunks_ && b - a < max_chunks) {
        cleaning_.set(b);
        if (!dirty_.clear(b)) {
          cleaning_.clear(b);
          break;
        }
        ++b;
      }
      if (b > a) window.emplace_back(a, b - 1);
      c = dirty_.find_set(b > a ? b : a + 1);
    }
    if (window.empty()) break;
    // Run the window concurrently on this executor and wait for all of it.
    auto all_done = std::make_shared<core::SharedEvent>();
    auto remaining = std::make_shared<size_t>(window.size());
    std::vector<std::error_code> results(window.size());
    for (size_t i = 0; i < window.size(); ++i) {
      boost::asio::co_spawn(ex, write_back_run(window[i].first, window[i].second),
                            [&results, i, remaining, all_done](std::exception_ptr e, std::error_code rec) {
                              results[i] = e ? errno_code(EIO) : rec;
                              if (--*remaining == 0) all_done->set();
                            });
    }
    // Only the runs keep the event alive while this frame waits on it: were
    // they abandoned (the loop destroyed mid-flight), the event, its waiter
    // and so this frame are freed with them instead of keeping each other
    // alive.
    auto waiting = core::SharedEvent::wait_unowned(std::move(all_done));
    co_await std::move(waiting);
    for (size_t i = 0; i < window.size(); ++i) {
      if (results[i]) {
        redirty(window[i].first, window[i].second);
        if (!ec) ec = results[i];
      } else {
        cleaned.push_back(window[i]);
      }
    }
  }
  if (!cleaned.empty()) {
    // Clean only once the remote made the data durable.
    auto fec = co_await flush_remote();
    if (fec) {
      for (auto [a, b] : cleaned) redirty(a, b);
      if (!ec) ec = fec;
    } else {
      for (auto [a, b] : cleaned)
        for (uint64_t x = a; x <= b; ++x) cleaning_.clear(x);
    }
  }
  if (ec) {
    wb_errors_.fetch_add(1, std::memory_order_relaxed);
    log_->warn("export '{}': write-back failed: {}", name_, ec.message());
  }
  co_return ec;
}

// ---- remote flushes and lost writes ----

core::IoFlags CacheLayer::remote_fua(core::IoFlags flags) const noexcept {
  return (flags & core::kFua) && remote_caps_.fua == Support::native ? core::kFua : 0;
}

bool CacheLayer::needs_remote_flush(core::IoFlags flags) const noexcept {
  return (flags & core::kFua) && remote_caps_.fua != Support::native && remote_caps_.flush == Support::native;
}

Task<std::error_code> CacheLayer::flush_remote() {
  const uint64_t ticket = flush_requested_.fetch_add(1, std::memory_order_acq_rel) + 1;
  auto guard = co_await flush_mutex_.lock();
  // Group commit: a flush that started after this request arrived covers it,
  // whatever it returned (waiting to fail the same way again, one request
  // after another, would multiply the retry timeout by the queue's length).
  if (flush_attempted_ >= ticket) co_return flush_result_;
  const uint64_t started = flush_requested_.load(std::memory_order_acquire);
  // Writes that ended before this point are covered by the flush; those
  // ending later count again, and note themselves in the new epoch.
  const uint64_t covers = remote_writes_.load(std::memory_order_acquire);
  const uint32_t covered = flush_epoch_.fetch_xor(1, std::memory_order_seq_cst);
  auto ec = co_await next().flush();
  if (!ec) {
    uint64_t seen = remote_writes_flushed_.load(std::memory_order_relaxed);
    while (seen < covers && !remote_writes_flushed_.compare_exchange_weak(seen, covers, std::memory_order_acq_rel)) {
    }
    auto& u = unflushed_[covered];
    std::lock_guard lock(u.mutex);
    for (uint64_t c : u.noted) u.chunks.clear(c);
    u.noted.clear();
    u.unreplayable.store(0);
    last_remote_flush_.store(std::chrono::steady_clock::now().time_since_epoch().count(), std::memory_order_relaxed);
  } else if (ec == core::writes_lost_error()) {
    replay_lost_writes();
  }
  flush_attempted_ = started;
  flush_result_ = ec;
  co_return ec;
}

uint64_t CacheLayer::remote_write_begin() const noexcept { return lost_write_reports_.load(std::memory_order_seq_cst); }

void CacheLayer::remote_write_end(uint64_t first, uint64_t last, uint64_t begun, bool replayable, std::error_code ec,
                                  bool durable) noexcept {
  // A failed change leaves its range undefined, and a FUA one is durable by
  // itself: nothing for a lost session to take back.
  if (ec || durable) return;
  auto& u = unflushed_[flush_epoch_.load(std::memory_order_seq_cst)];
  if (replayable) {
    for (uint64_t c = first; c <= last; ++c) {
      if (u.chunks.test(c) || u.chunks.set(c)) continue;
      std::lock_guard lock(u.mutex);
      u.noted.push_back(c);
    }
  } else {
    u.unreplayable.fetch_add(1, std::memory_order_seq_cst);
  }
  // A loss reported while this change was between its start and its note
  // may include it, and replay_lost_writes() did not see it.
  if (lost_write_reports_.load(std::memory_order_seq_cst) == begun) return;
  if (replayable) {
    for (uint64_t c = first; c <= last; ++c) dirty_.set(c);
    replayed_chunks_.fetch_add(last - first + 1, std::memory_order_relaxed);
  } else if (!sticky_loss_.exchange(true)) {
    log_->error("export '{}': the remote may have lost a write it acknowledged (a reconnect before a flush); "
                "the cache does not hold its bytes: the next FLUSH fails with EIO",
                name_);
  }
}

void CacheLayer::replay_lost_writes() {
  // Counted first: a change between its start and its note sees the count
  // move and marks itself (remote_write_end), one that noted itself already
  // is found below.
  lost_write_reports_.fetch_add(1, std::memory_order_seq_cst);
  uint64_t again = 0, unreplayable = 0;
  for (auto& u : unflushed_) {
    unreplayable += u.unreplayable.load(std::memory_order_seq_cst);
    std::lock_guard lock(u.mutex);
    for (uint64_t c : u.noted) {
      if (present_.test(c)) {  // pinned: not evicted; a drop would have counted it unreplayable
        dirty_.set(c);
        ++again;
      } else {
        ++unreplayable;
      }
    }
  }
  replayed_chunks_.fetch_add(again, std::memory_order_relaxed);
  if (unreplayable && !sticky_loss_.exchange(true))
    log_->error("export '{}': the remote lost writes it had acknowledged (a reconnect before they were flushed); "
                "{} chunks are written again from the cache, but {} writes whose bytes the cache does not hold "
                "are gone: the next FLUSH fails with EIO",
                name_, again, unreplayable);
  else
    log_->warn("export '{}': the remote lost writes it had acknowledged (a reconnect before they were flushed); "
               "writing {} chunks again from the cache",
               name_, again);
}

bool CacheLayer::pinned(uint64_t c) const noexcept { return unflushed_[0].chunks.test(c) || unflushed_[1].chunks.test(c); }

void CacheLayer::forget_replayable(uint64_t c) noexcept {
  for (auto& u : unflushed_)
    if (u.chunks.test(c)) u.unreplayable.fetch_add(1, std::memory_order_seq_cst);
}

std::error_code CacheLayer::take_sticky_loss() {
  if (!sticky_loss_.exchange(false)) return {};
  failed_requests_.fetch_add(1, std::memory_order_relaxed);
  log_->error("export '{}': FLUSH fails with EIO: the remote lost acknowledged writes in a reconnect that the "
              "cache could not write again",
              name_);
  return errno_code(EIO);
}

void CacheLayer::remote_write_done(core::IoFlags remote_flags, std::error_code ec) noexcept {
  // A FUA write that succeeded is durable by itself; anything else (a failed
  // one may have landed in part) waits for a flush.
  if (ec || !(remote_flags & core::kFua)) remote_writes_.fetch_add(1, std::memory_order_acq_rel);
}

bool CacheLayer::remote_flush_owed() const noexcept {
  return remote_writes_flushed_.load(std::memory_order_acquire) != remote_writes_.load(std::memory_order_acquire);
}

}  // namespace blockway::cache
