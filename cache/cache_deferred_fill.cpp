// CacheLayer: deferred fills, the first write into an absent chunk in the
// write-back modes (issue 17).
//
// Why: a write that covers an absent chunk only in part used to fetch the
// chunk from the remote before it could land in the cache file (the rest of
// the chunk must hold the image's bytes), so a sequential writer into an
// empty cache waited one remote round trip per chunk (0.08x the local disk
// with 64 KiB chunks and 1 ms to the remote). Now the write converts its
// claim on such a chunk into a deferred fill, writes its bytes into the
// cache file at once, records their range in the fill, and is answered. The
// fill fetches the chunk behind it; later writes to the chunk join the fill
// (add their range, write their bytes) instead of waiting. When the fetch
// returns the fill closes (no more joins); once no joined write is still
// writing (the fetch, or the last write out, completes it), only the ranges
// no write covered are copied into the cache file, and the chunk becomes
// present and dirty the normal way (dirty before present, after the cache
// file holds every byte: invariant 3). Write-zeroes and trim in these modes
// take the same path.
//
// A chunk the writes cover whole needs nothing from the remote: the last
// joined write out closes and completes it at once (whatever its fetch is
// doing; the fetch's bytes are dropped). And the fetch does not start at
// once: it waits while writes keep joining (grace_, a step of 250 us: a
// sequential writer covers a 64 KiB chunk in far less, so its chunks are
// never read from the remote), and starts after a step with no join, after
// grace_.max, or at once when a read or FLUSH waits for the chunk
// (urge_deferred cancels the grace timer).
//
// Crash safety: nothing about a pending chunk is persisted; it is not
// present (so no checkpoint, eviction, write-back, drop, detach or prefetch
// takes it for a cache chunk: they skip it or wait on its claim), and its
// region keeps its write-intent while the fill runs. A crash before the fill
// completes loses only writes no FLUSH covered, which the write-back modes
// allow. FLUSH (and FUA, for its own chunks) waits for the fills that exist
// when it starts (settle_deferred), so what it acknowledges is present and
// dirty before its checkpoint or write-back.
//
// A fetch that fails is tried again (10 ms, doubling to 0.5 s) while the
// written bytes wait in the cache file; a FLUSH, FUA or read that waits for
// the fill meanwhile fails with the fetch's error (EIO for FLUSH and FUA),
// and the chunk stays pending until a fetch works or writes cover it whole.
// Only a stop (close) with the remote still away, or a failed cache-file
// write, gives up: those writes are lost, logged at error, and the next
// FLUSH fails with EIO.
//
// Back-pressure: at most kMaxDeferred fills at a time; past that, writes
// fetch first as before.
//
// Thread model: as CacheLayer's. A fill's state is under its own mutex
// (never held across I/O; inside a shard mutex at most, never around one;
// several only in chunk order); its fetch and completion run on the background executor and never
// wait on an event the fill owns; deferred_ counts the fills running, and
// abandon() waits for it to drop to zero.
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include "core/buffer_pool.hpp"
#include "core/logging.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <exception>

namespace blockway::cache {
namespace {

using Ranges = std::vector<std::pair<uint32_t, uint32_t>>;

// Adds [lo, hi) to sorted, disjoint ranges, merging what touches it.
void add_range(Ranges& r, uint32_t lo, uint32_t hi) {
  auto it = std::lower_bound(r.begin(), r.end(), lo, [](const auto& e, uint32_t v) { return e.second < v; });
  auto stop = it;
  while (stop != r.end() && stop->first <= hi) {
    lo = std::min(lo, stop->first);
    hi = std::max(hi, stop->second);
    ++stop;
  }
  it = r.erase(it, stop);
  r.insert(it, {lo, hi});
}

}  // namespace

std::vector<uint64_t> CacheLayer::deferrable_ends(ByteRange range, const std::vector<uint64_t>& mine) {
  std::vector<uint64_t> out;
  if (stopping_.load(std::memory_order_acquire)) return out;
  const uint64_t first = chunk_of(range.offset), last = chunk_of(range.end() - 1);
  const bool head_partial = range.offset != chunk_start(first) || range.end() < chunk_start(first) + chunk_len(first);
  const bool tail_partial = last != first && range.end() < chunk_start(last) + chunk_len(last);
  auto take = [&](uint64_t c) {
    if (!std::binary_search(mine.begin(), mine.end(), c) || present_.test(c)) return;
    if (deferred_.fetch_add(1, std::memory_order_acq_rel) >= kMaxDeferred) {
      deferred_.fetch_sub(1, std::memory_order_acq_rel);
      return;
    }
    out.push_back(c);
  };
  if (head_partial) take(first);
  if (tail_partial) take(last);
  return out;
}

std::shared_ptr<CacheLayer::Fill> CacheLayer::join_deferred(const DeferredSeen& seen, ByteRange range) {
  // claim() met them in increasing chunk order: the locks are taken in it.
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(seen.size());
  for (const auto& [c, f] : seen) {
    locks.emplace_back(f->deferred->mutex);
    if (f->deferred->closed) return f;
  }
  for (const auto& [c, f] : seen) {
    const uint64_t cs = chunk_start(c);
    const uint64_t lo = std::max(range.offset, cs), hi = std::min(range.end(), cs + chunk_len(c));
    add_range(f->deferred->written, static_cast<uint32_t>(lo - cs), static_cast<uint32_t>(hi - cs));
    ++f->deferred->writers;
    ++f->deferred->joins;
  }
  return nullptr;
}

void CacheLayer::start_deferred(const std::vector<uint64_t>& defer, const std::shared_ptr<Fill>& claim_fill,
                                ByteRange range, DeferredSeen& joined) {
  for (uint64_t c : defer) {
    auto pf = std::make_shared<Fill>();
    pf->deferred = std::make_unique<Fill::Deferred>();
    auto& d = *pf->deferred;
    d.attempt = std::make_shared<core::SharedEvent>();
    const uint64_t cs = chunk_start(c);
    const uint64_t lo = std::max(range.offset, cs), hi = std::min(range.end(), cs + chunk_len(c));
    d.written.emplace_back(static_cast<uint32_t>(lo - cs), static_cast<uint32_t>(hi - cs));
    d.writers = 1;
    d.joins = 1;
    {
      // The caller's claim on c becomes the fill's: whoever waits on the
      // caller's claim looks at c again and finds this one.
      auto& s = shard(c);
      std::lock_guard lock(s.mutex);
      auto it = s.fills.find(c);
      if (it != s.fills.end() && it->second == claim_fill) it->second = pf;
    }
    region_writes_[c / kChunksPerRegion].fetch_add(1, std::memory_order_seq_cst);
    joined.emplace_back(c, pf);
    deferred_runners_.fetch_add(1, std::memory_order_acq_rel);
    spawn_deferred(run_deferred(c, pf), c, true);
  }
  std::sort(joined.begin(), joined.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
}

void CacheLayer::spawn_deferred(Task<void> task, uint64_t c, bool runner) {
  boost::asio::co_spawn(background_, std::move(task), [this, c, runner](std::exception_ptr e) {
    if (e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& ex) {
        log_->error("export '{}': the deferred fill of chunk {} failed: {}", name_, c, ex.what());
      }
    }
    if (runner) deferred_runners_.fetch_sub(1, std::memory_order_acq_rel);  // the last touch: close() may go on
  });
}

Task<void> CacheLayer::run_deferred(uint64_t c, std::shared_ptr<Fill> pf) {
  // No wait here is on an event the fill owns (only remote I/O and a timer):
  // a frame waiting on an event of the fill it holds would keep both alive
  // forever if the event loop were torn down under it.
  auto& d = *pf->deferred;
  const uint64_t off = chunk_start(c), len = chunk_len(c);
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  // Grace: a sequential writer covers the chunk within a few hundred
  // microseconds (sixteen 4 KiB writes at QD16 make a 64 KiB chunk), and a
  // covered chunk needs nothing from the remote. Fetching at once read every
  // chunk of a first sequential write (the remote's CPU, the socket copy,
  // this daemon's recv: a fifth of its CPU there) only to throw it away. So
  // the fetch waits while writes keep joining: it starts after a step in
  // which none joined, when a reader or FLUSH waits for it (urge), or after
  // grace_.max; a random writer's chunk waits one step. Nothing waits on
  // the fill meanwhile but reads and FLUSHes of this chunk, which urge it.
  const auto started = std::chrono::steady_clock::now();
  for (uint64_t joins = 0;;) {
    {
      std::lock_guard lock(d.mutex);
      // Covered: the last joined write out completes it (leave_deferred).
      if (d.closed || d.covers(len)) co_return;
      if (d.urgent) break;
      if (d.joins == joins) break;  // a step passed with no write joining
      joins = d.joins;
    }
    if (stopping_.load(std::memory_order_acquire) || std::chrono::steady_clock::now() - started >= grace_.max) break;
    timer.expires_after(grace_.step);
    {
      std::lock_guard lock(d.mutex);
      d.grace_timer = &timer;  // urge_deferred() cancels it (on this loop)
    }
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    std::lock_guard lock(d.mutex);
    d.grace_timer = nullptr;
  }
  core::IoBuffer buf;
  std::error_code ec;
  bool fetched = false;
  for (auto backoff = std::chrono::milliseconds(10);;) {
    {
      std::lock_guard lock(d.mutex);
      if (d.closed || d.covers(len)) co_return;  // as above
    }
    if (buf.size() == 0) buf = core::IoBuffer(len);
    ec = co_await fetch_bytes(buf.span(), off, 0);
    if (!ec) {
      fetched = true;
      break;
    }
    if (stopping_.load(std::memory_order_acquire)) break;
    log_->debug("export '{}': deferred fill of chunk {} failed ({}); trying again in {} ms", name_, c, ec.message(),
                backoff.count());
    std::shared_ptr<core::SharedEvent> failed;
    {
      std::lock_guard lock(d.mutex);
      failed = std::exchange(d.attempt, std::make_shared<core::SharedEvent>());
    }
    failed->set(ec);  // those waiting on this attempt learn of it
    timer.expires_after(backoff);
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(500));
  }
  // Closed: no write joins any more; the last of those joined completes.
  bool now = false;
  {
    std::lock_guard lock(d.mutex);
    if (d.closed || d.covers(len)) co_return;  // covered meanwhile: as above
    d.closed = true;
    d.fetched = fetched;
    d.fetch_ec = ec;
    if (fetched) d.data = std::move(buf);
    now = d.writers == 0;
  }
  if (now) co_await complete_deferred(c, std::move(pf));
}

void CacheLayer::wake_runner(const std::shared_ptr<Fill>& f) {
  // Under f's mutex. The timer lives in the runner's frame on background_,
  // and only that loop touches it: the cancel goes there, and finds it only
  // while the runner still waits (it clears grace_timer on that loop when it
  // wakes).
  if (f->deferred->grace_timer)
    boost::asio::post(background_, [f] {
      std::lock_guard lock(f->deferred->mutex);
      if (f->deferred->grace_timer) f->deferred->grace_timer->cancel();
    });
}

std::shared_ptr<core::SharedEvent> CacheLayer::urge_deferred(const std::shared_ptr<Fill>& f) {
  auto& d = *f->deferred;
  std::lock_guard lock(d.mutex);
  if (!d.urgent) {
    d.urgent = true;
    wake_runner(f);
  }
  return d.attempt;
}

void CacheLayer::leave_deferred(const DeferredSeen& joined, std::error_code) {
  // A joined write that failed leaves its range undefined in a chunk that
  // becomes dirty: the client's failed write, as in settle_cache_change.
  for (const auto& [c, f] : joined) {
    bool last = false;
    {
      std::lock_guard lock(f->deferred->mutex);
      auto& d = *f->deferred;
      // Covered by the writes, none of them still writing: nothing is needed
      // from the remote, so it completes now, not when its fetch (or grace)
      // ends; a runner still fetching or waiting drops out when it sees it.
      if (--d.writers == 0 && !d.closed && d.covers(chunk_len(c))) {
        d.closed = true;
        wake_runner(f);  // its grace is over: it leaves
      }
      last = d.writers == 0 && d.closed;
    }
    if (last) spawn_deferred(complete_deferred(c, f), c);
  }
}

Task<void> CacheLayer::complete_deferred(uint64_t c, std::shared_ptr<Fill> pf) {
  auto& d = *pf->deferred;  // closed, no writers: nothing changes it any more
  const uint64_t off = chunk_start(c), len = chunk_len(c);
  Ranges written;
  bool covered = false;
  std::error_code ec;
  {
    std::lock_guard lock(d.mutex);
    written = d.written;
    covered = d.covers(len);
    ec = d.fetch_ec;
  }
  if (covered) {
    ec = {};
  } else if (d.fetched) {
    // Only what no write covered comes from the remote.
    uint64_t pos = 0;
    for (size_t i = 0; i <= written.size() && !ec; ++i) {
      const uint64_t gap_end = i < written.size() ? written[i].first : len;
      if (gap_end > pos) ec = co_await cache_file_->write(d.data.span().subspan(pos, gap_end - pos), off + pos, 0);
      if (i < written.size()) pos = written[i].second;
    }
    if (ec) log_->error("export '{}': writing the cache file failed: {}", name_, ec.message());
  }
  d.data.reset();
  if (!ec) {
    dirty_.set(c);
    present_.set(c);
    if (d.fetched && !covered) fetched_.fetch_add(len, std::memory_order_relaxed);  // only what it used
  } else {
    deferred_loss_.store(true, std::memory_order_release);
    failed_requests_.fetch_add(1, std::memory_order_relaxed);
    uint64_t bytes = 0;
    for (const auto& [lo, hi] : written) bytes += hi - lo;
    log_->error("export '{}': {} bytes written to chunk {} (at {}) were lost: the rest of the chunk could not be "
                "merged ({}); the next FLUSH fails with EIO",
                name_, bytes, c, off, ec.message());
  }
  {
    auto& s = shard(c);
    std::lock_guard lock(s.mutex);
    if (auto it = s.fills.find(c); it != s.fills.end() && it->second == pf) s.fills.erase(it);
  }
  const uint64_t r = c / kChunksPerRegion;
  touched_.set(r);
  region_writes_[r].fetch_sub(1, std::memory_order_seq_cst);
  std::shared_ptr<core::SharedEvent> attempt;
  {
    std::lock_guard lock(d.mutex);
    attempt = d.attempt;
  }
  deferred_.fetch_sub(1, std::memory_order_acq_rel);  // the last touch of *this: close() may go on
  attempt->set(ec);
  pf->done.set(ec);
}

Task<std::error_code> CacheLayer::settle_deferred(uint64_t first, uint64_t last) {
  std::vector<std::weak_ptr<Fill>> fills;
  if (deferred_.load(std::memory_order_acquire) > 0) {
    auto take = [&](const std::shared_ptr<Fill>& f) {
      if (f->deferred) fills.push_back(f);
    };
    if (last - first < 4 * kShards) {
      for (uint64_t c = first; c <= last; ++c) {
        auto& s = shard(c);
        std::lock_guard lock(s.mutex);
        if (auto it = s.fills.find(c); it != s.fills.end()) take(it->second);
      }
    } else {
      for (auto& s : shards_) {
        std::lock_guard lock(s.mutex);
        for (const auto& [c, f] : s.fills)
          if (c >= first && c <= last) take(f);
      }
    }
  }
  std::error_code result;
  // Weak: this frame never owns a fill or its events (see wait_unowned).
  for (const auto& wf : fills) {
    std::shared_ptr<core::SharedEvent> attempt;
    if (auto f = wf.lock(); f && !f->done.is_set()) attempt = urge_deferred(f);
    if (!attempt) continue;  // completed; a loss shows in deferred_loss_
    auto waiting = core::SharedEvent::wait_unowned(std::move(attempt));
    if (auto ec = co_await std::move(waiting); ec && !result) {
      failed_requests_.fetch_add(1, std::memory_order_relaxed);
      log_->warn("export '{}': a flush waited for the fetch of a partly written chunk, which failed ({}); the "
                 "written bytes are kept and the fetch is tried again",
                 name_, ec.message());
      result = errno_code(EIO);
    }
  }
  if (result) co_return result;
  if (deferred_loss_.exchange(false, std::memory_order_acq_rel)) co_return errno_code(EIO);
  co_return std::error_code{};
}

}  // namespace blockway::cache
