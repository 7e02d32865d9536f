// CacheLayer: the client requests (read, write, zero, trim, flush, block
// status) in every write mode.
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include "core/io_trace.hpp"
#include "core/logging.hpp"
#include "core/remote_device.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <functional>
#include <iterator>
#include <string>

namespace blockway::cache {
namespace {

// A traced read learns whether it hit; one split into pieces hit only if every piece did.
void note_outcome(core::RequestNote* note, core::CacheOutcome outcome) noexcept {
  if (note && note->cache != core::CacheOutcome::miss) note->cache = outcome;
}

// Whether every region of chunks [first, last] has a persisted write-intent:
// then ensure_intent() has nothing to do, and a write skips its coroutine
// frame (most writes: one commit covers a sequential writer's next 32 MiB).
bool intent_held(const AtomicBitmap& intent, const AtomicBitmap& persisted, uint64_t first, uint64_t last,
                 uint64_t per_region) noexcept {
  for (uint64_t r = first / per_region; r <= last / per_region; ++r)
    if (!intent.test(r) || !persisted.test(r)) return false;
  return true;
}

}  // namespace

// ---- requests ----------------------------------------------------------------

void CacheLayer::mark_referenced(uint64_t first, uint64_t last) noexcept {
  if (!capacity_chunks_) return;
  for (uint64_t c = first; c <= last; ++c)
    if (!referenced_.test(c)) referenced_.set(c);
}

std::error_code CacheLayer::request_failed(const char* what, uint64_t length, uint64_t offset, const char* where,
                                           std::error_code ec) {
  failed_requests_.fetch_add(1, std::memory_order_relaxed);
  log_->warn("export '{}': {} of {} bytes at {} failed: {}: {}", name_, what, length, offset, where, ec.message());
  return ec;
}

Task<std::error_code> CacheLayer::read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) {
  // Taken before anything can suspend: it belongs to the request that called.
  core::RequestNote* note = core::take_request_note();
  if (buf.empty()) co_return std::error_code{};
  InFlight inflight(*this);
  if (switching_.load(std::memory_order_seq_cst)) [[unlikely]]
    co_await wait_for_switch();
  if (local_.load(std::memory_order_acquire)) {
    note_outcome(note, core::CacheOutcome::hit);
    co_return co_await cache_file_->read(buf, offset, 0);
  }
  const uint64_t first = chunk_of(offset), last = chunk_of(offset + buf.size() - 1);
  if (!(flags & kUnrecorded) && (!seen_.test(first) || !seen_.test(last))) record_first_reads(first, last);
  for (bool missed = false;;) {
    {
      // Hit: no claim, only the eviction grace period.
      EpochGuard guard(*this);
      if (present_.all_set(first, last)) {
        if (!missed) {
          hits_.fetch_add(1, std::memory_order_relaxed);
          note_outcome(note, core::CacheOutcome::hit);
        }
        mark_referenced(first, last);
        auto ec = co_await cache_file_->read(buf, offset, 0);
        if (ec) co_return request_failed("read", buf.size(), offset, "reading the cache file", ec);
        co_return ec;
      }
    }
    if (missed) break;
    missed = true;
    misses_.fetch_add(1, std::memory_order_relaxed);
    note_outcome(note, core::CacheOutcome::miss);
    // When other requests are filling every absent chunk of the range, wait
    // for their fills and read as a hit (the loop's second look) instead of
    // claiming the chunks after them: read_miss claims present chunks too,
    // so readers that all want a chunk being fetched (a base's clones
    // reading the same blocks) would each take the claim in turn, every
    // release waking all the others. A fill that failed leaves its chunk
    // absent: read_miss then fetches it.
    // Chunks written in part whose fetch runs behind the writes (deferred
    // fills) first, all of them: a failed fetch fails this read, where the
    // claim of read_miss would wait for the fill until the remote answers.
    // All of them are urged before the first wait, so their fetches overlap:
    // a read over N pending chunks takes about one fetch, not N.
    std::vector<std::shared_ptr<core::SharedEvent>> attempts;
    for (uint64_t c = first; c <= last; ++c) {
      if (present_.test(c)) continue;
      std::shared_ptr<Fill> pending;
      {
        auto& s = shard(c);
        std::lock_guard lock(s.mutex);
        if (auto it = s.fills.find(c); it != s.fills.end() && it->second->deferred) pending = it->second;
      }
      if (pending) attempts.push_back(urge_deferred(pending));
    }
    for (auto& attempt : attempts) {
      auto waiting = core::SharedEvent::wait_unowned(std::move(attempt));
      if (auto ec = co_await std::move(waiting))
        co_return request_failed("read", buf.size(), offset, "fetching from the remote", ec);
    }
    bool waited = false;
    for (uint64_t c = first; c <= last; ++c) {
      if (present_.test(c)) continue;
      std::shared_ptr<Fill> other;
      {
        auto& s = shard(c);
        std::lock_guard lock(s.mutex);
        if (auto it = s.fills.find(c); it != s.fills.end()) other = it->second;
      }
      if (!other) {  // nobody fills it: this read will
        waited = false;
        break;
      }
      if (other->deferred) {
        // A chunk written in part whose fetch runs behind the writes: wait
        // for the fetch's next outcome; a failed one fails this read (the
        // fill goes on trying).
        std::shared_ptr<core::SharedEvent> attempt = urge_deferred(other);
        other.reset();
        auto waiting = core::SharedEvent::wait_unowned(std::move(attempt));
        if (auto ec = co_await std::move(waiting))
          co_return request_failed("read", buf.size(), offset, "fetching from the remote", ec);
        waited = true;
        continue;
      }
      // Not owning the Fill while waiting (see SharedEvent::wait_unowned).
      core::SharedEvent* done = &other->done;
      auto waiting = core::SharedEvent::wait_unowned(std::shared_ptr<core::SharedEvent>(std::move(other), done));
      (void)co_await std::move(waiting);
      waited = true;
    }
    if (!waited) break;
  }
  auto ec = co_await read_miss(buf, offset, first, last);
  // A miss right after the previous one: read ahead of a sequential reader.
  if (!ec && last_miss_end_.exchange(last + 1, std::memory_order_relaxed) == first) start_readahead(last + 1);
  co_return ec;
}

Task<std::error_code> CacheLayer::read_miss(std::span<std::byte> buf, uint64_t offset, uint64_t first, uint64_t last) {
  // Claim every chunk of the range, the present ones too: while the claim is
  // held no eviction, fill or writethrough change can take a chunk away, so
  // the read cannot find a chunk it just fetched evicted again (with a
  // capacity far below the working set, reads that span chunks used to fail
  // that way). Hits never take this path, so they stay claim-free.
  auto [fill, mine] = co_await claim(first, last, true);
  // Runs of present chunks are read from the cache file; runs of absent ones
  // (up to kMaxRun) are fetched and delivered into the reply by fetch_run,
  // which writes them to the cache file too: the fetched bytes are not read
  // back from it. A reader that waited on this claim finds them present.
  const uint64_t end = offset + buf.size();
  const uint64_t max_chunks = std::max<uint64_t>(1, kMaxRun >> chunk_shift_);
  std::error_code ec;
  for (uint64_t c = first; c <= last && !ec;) {
    const bool have = present_.test(c);
    uint64_t d = c;
    while (d < last && present_.test(d + 1) == have && (have || d + 1 - c < max_chunks)) ++d;
    const uint64_t lo = std::max(offset, chunk_start(c));
    const uint64_t hi = std::min(end, chunk_start(d) + chunk_len(d));
    const auto part = buf.subspan(lo - offset, hi - lo);
    if (have) {
      ec = co_await cache_file_->read(part, lo, 0);
      if (ec) request_failed("read", buf.size(), offset, "reading the cache file", ec);
    } else {
      ec = co_await fetch_run(c, d, 0, part, lo);
      if (ec) request_failed("read", buf.size(), offset, "fetching from the remote", ec);
    }
    c = d + 1;
  }
  if (!ec) mark_referenced(first, last);
  release(fill, mine, ec);
  co_return ec;
}

Task<std::error_code> CacheLayer::ensure_intent(uint64_t first, uint64_t last) {
  bool need = false;
  for (uint64_t r = first / kChunksPerRegion; r <= last / kChunksPerRegion; ++r) {
    if (!intent_.test(r)) {
      intent_.set(r);
      need = true;
    } else if (!intent_persisted_.test(r)) {
      need = true;
    }
  }
  if (!need) co_return std::error_code{};
  // A writer that moves on from a region with intent into the next one (a
  // sequential writer) gets the intent of the regions after it too, in this
  // same commit: else every new region (4 MiB of 64 KiB chunks) held up all
  // its writes for a catalogue commit and its fsync, sixty-four of them per
  // 256 MiB of first writes. More intent than needed is safe (recovery only
  // drops the clean chunks of those regions; the next checkpoint after the
  // writes clears what no write touched). How far ahead is capped in bytes
  // (kIntentAheadBytes, at least one region), so large chunks, whose regions
  // are large, do not put gigabytes of clean chunks at risk.
  const uint64_t r0 = first / kChunksPerRegion, r1 = last / kChunksPerRegion;
  const uint64_t ahead = std::max<uint64_t>(1, kIntentAheadBytes / (kChunksPerRegion << chunk_shift_));
  if (r0 > 0 && intent_.test(r0 - 1))
    for (uint64_t r = r1 + 1; r <= r1 + ahead && r < nregions_.load(std::memory_order_acquire); ++r)
      if (!intent_.test(r)) intent_.set(r);
  co_return co_await checkpoint(false);
}

Task<std::error_code> CacheLayer::write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  if (buf.empty()) co_return std::error_code{};
  InFlight inflight(*this);
  if (switching_.load(std::memory_order_seq_cst)) [[unlikely]]
    co_await wait_for_switch();
  if (local_.load(std::memory_order_acquire)) co_return co_await local_write(buf, offset, flags);
  if (mode() == WriteMode::writethrough) co_return co_await write_through(buf, offset, flags);
  co_return co_await write_cached(buf, offset, flags);
}

Task<std::error_code> CacheLayer::fetch_partial_ends(ByteRange range, const std::vector<uint64_t>& mine) {
  // A chunk that a change covers only in part must hold the rest of its data
  // before the change lands in the cache file. Only claimed chunks are
  // fetched; a present one that is not claimed is checked under the epoch
  // guard afterwards (chunks_ready).
  const uint64_t first = chunk_of(range.offset), last = chunk_of(range.end() - 1);
  const bool head_partial = range.offset != chunk_start(first) || range.end() < chunk_start(first) + chunk_len(first);
  const bool tail_partial = last != first && range.end() < chunk_start(last) + chunk_len(last);
  auto is_mine = [&](uint64_t c) { return std::binary_search(mine.begin(), mine.end(), c); };
  if (head_partial && is_mine(first) && !present_.test(first))
    if (auto ec = co_await fetch_run(first, first)) co_return ec;
  if (tail_partial && is_mine(last) && !present_.test(last))
    if (auto ec = co_await fetch_run(last, last)) co_return ec;
  co_return std::error_code{};
}

void CacheLayer::settle_cache_change(uint64_t first, uint64_t last, const std::vector<uint64_t>& mine,
                                     std::error_code ec, const std::vector<uint64_t>& deferred) noexcept {
  if (!ec) {
    for (uint64_t c = first; c <= last; ++c)
      if (!std::binary_search(deferred.begin(), deferred.end(), c)) dirty_.set(c);
    for (uint64_t c : mine) present_.set(c);
    return;
  }
  // Part of the change may be in the cache file: a clean chunk must not keep
  // bytes the remote does not have. (A dirty one is the client's failed write
  // to undefined contents, and stays dirty.)
  for (uint64_t c = first; c <= last; ++c)
    if (!dirty_.test(c) && !cleaning_.test(c)) {
      present_.clear(c);
      forget_replayable(c);
    }
}

Task<std::error_code> CacheLayer::write_cached(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  const std::function<Task<std::error_code>()> change = [&] { return cache_file_->write(buf, offset, 0); };
  co_return co_await change_cached({offset, buf.size()}, flags, "write", "written", "writing", change);
}

Task<std::error_code> CacheLayer::change_cached(ByteRange range, IoFlags flags, const char* what, const char* partly,
                                                const char* verb,
                                                const std::function<Task<std::error_code>()>& change) {
  const uint64_t first = chunk_of(range.offset), last = chunk_of(range.end() - 1);
  auto failed = [&](const std::string& where, std::error_code ec) {
    return request_failed(what, range.length, range.offset, where.c_str(), ec);
  };
  RegionWrites guard(*this, first, last);
  if (!intent_held(intent_, intent_persisted_, first, last, kChunksPerRegion))
    if (auto ec = co_await ensure_intent(first, last)) co_return failed("persisting the write intent", ec);
  std::error_code ec;
  bool joined_any = false;
  for (int attempt = 0;;) {
    // Absent chunks are claimed (no fill may store older bytes over this
    // change); present ones only after two rounds lost one of them to
    // eviction, and then no eviction can take them. Chunks with a deferred
    // fill (cache_deferred_fill.cpp) are joined, not waited for.
    DeferredSeen seen;
    auto [fill, mine] = co_await claim(first, last, attempt >= kClaimAllAfter, &seen);
    // Absent chunks at either end that the change covers in part: deferred
    // while the budget lasts (fetched behind it), else fetched first.
    const auto defer = deferrable_ends(range, mine);
    std::vector<uint64_t> fetch_first;
    std::set_difference(mine.begin(), mine.end(), defer.begin(), defer.end(), std::back_inserter(fetch_first));
    // (Nothing to fetch first for most writes: a sequential writer's chunks
    // are deferred or joined; no coroutine frame then.)
    if (auto pec = fetch_first.empty() ? std::error_code{} : co_await fetch_partial_ends(range, fetch_first)) {
      deferred_.fetch_sub(defer.size(), std::memory_order_acq_rel);
      release(fill, mine, pec);
      co_return failed(std::string("fetching the rest of a partly ") + partly + " chunk", pec);
    }
    bool done = false;
    std::shared_ptr<Fill> busy;  // a deferred fill that closed before this change could join it
    {
      EpochGuard guard(*this);
      // Eviction may have taken a chunk since it was checked: then start over.
      std::vector<uint64_t> held = mine;
      for (const auto& e : seen) held.push_back(e.first);
      std::sort(held.begin(), held.end());
      done = chunks_ready(first, last, held);
      if (done && !seen.empty() && (busy = join_deferred(seen, range))) done = false;
      if (done) {
        DeferredSeen joined = std::move(seen);
        start_deferred(defer, fill, range, joined);
        std::vector<uint64_t> pending;
        for (const auto& e : joined) pending.push_back(e.first);
        std::erase_if(mine, [&](uint64_t c) { return std::binary_search(defer.begin(), defer.end(), c); });
        ec = co_await change();
        settle_cache_change(first, last, mine, ec, pending);
        leave_deferred(joined, ec);
        joined_any = !joined.empty();
      }
    }
    if (!done) deferred_.fetch_sub(defer.size(), std::memory_order_acq_rel);  // not started
    release(fill, mine, ec);
    if (done) break;
    if (busy) {
      core::SharedEvent* ev = &busy->done;
      auto waiting = core::SharedEvent::wait_unowned(std::shared_ptr<core::SharedEvent>(std::move(busy), ev));
      (void)co_await std::move(waiting);
    } else {
      ++attempt;
    }
  }
  if (ec) co_return failed(std::string(verb) + " the cache file", ec);
  if (flags & core::kFua) {
    if (joined_any)
      if (auto sec = co_await settle_deferred(first, last))
        co_return failed(std::string("fetching the rest of a partly ") + partly + " chunk", sec);
    co_return co_await make_durable(first, last);
  }
  co_return std::error_code{};
}

bool CacheLayer::chunks_ready(uint64_t first, uint64_t last, const std::vector<uint64_t>& mine) const noexcept {
  size_t i = 0;
  for (uint64_t c = first; c <= last; ++c) {
    while (i < mine.size() && mine[i] < c) ++i;
    if (!(i < mine.size() && mine[i] == c) && !present_.test(c)) return false;
  }
  return true;
}

Task<std::error_code> CacheLayer::write_through(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  const uint64_t end = offset + buf.size();
  const uint64_t first = chunk_of(offset), last = chunk_of(end - 1);
  RegionWrites guard(*this, first, last);
  if (!intent_held(intent_, intent_persisted_, first, last, kChunksPerRegion))
    if (auto ec = co_await ensure_intent(first, last)) co_return ec;
  mark_remote_written(first, last);
  // Hold the chunks (absent ones: so that no fill can store data older than
  // this write; present ones: so that two overlapping writes update remote
  // and cache in the same order).
  auto [fill, mine] = co_await claim(first, last, true);
  // The cache file needs these bytes only for chunks that are present (to
  // stay in step with the remote) or that the write covers whole (write-
  // allocate); the part of an absent chunk at either end that the write
  // covers only in part is left out (it would take disk space no eviction
  // ever frees, since the chunk is not present). A write that only partly
  // covers absent chunks skips the cache: on a cold cache that saves a local
  // write per request. Decided under the claim, so no fill can make a chunk
  // present behind our back.
  const ByteRange for_cache = cacheable_part({offset, buf.size()});
  const bool cache_needs_it = for_cache.length > 0;
  const uint64_t begun = remote_write_begin();
  auto ec = co_await remote_change([&](IoFlags f) { return next().write(buf, offset, f); }, flags);
  const std::error_code remote_ec = ec;  // what the remote holds, whatever the cache file does next
  if (ec) {
    // The remote may hold part of the failed write: a clean chunk must not
    // keep the older bytes, or two reads could disagree once it is evicted.
    drop_clean_chunks(first, last);
    request_failed("write", buf.size(), offset, "writing to the remote", ec);
  }
  if (!ec && cache_needs_it) {
    if (auto cec = co_await cache_file_->write(buf.subspan(for_cache.offset - offset, for_cache.length),
                                               for_cache.offset, 0)) {
      // The remote has the data; the cache must not keep the old bytes.
      log_->warn("export '{}': cache file write failed ({}), dropping those chunks", name_, cec.message());
      if (drop_clean_chunks(first, last)) ec = cec;
    } else {
      for (uint64_t c : mine)  // write-allocate chunks the write covers whole
        if (offset <= chunk_start(c) && end >= chunk_start(c) + chunk_len(c)) present_.set(c);
      // A present chunk written partly keeps its present bit: the cache got the
      // same bytes as the remote.
      if ((flags & core::kFua) && owes_write_back(first, last)) ec = co_await cache_file_->flush();
    }
  }
  remote_write_end(first, last, begun, present_.all_set(first, last), remote_ec, flags & core::kFua);
  release(fill, mine, ec);
  co_return ec;
}

template <class Send>
Task<std::error_code> CacheLayer::remote_change(Send send, IoFlags flags) {
  auto ec = co_await send(remote_fua(flags));
  remote_write_done(remote_fua(flags), ec);
  if (!ec && needs_remote_flush(flags)) {
    // FUA emulated by a flush. If the flush reports lost writes, this very
    // change may be among them (sent on the session that died): send it
    // again on the new one, and flush again.
    for (int round = 1;; ++round) {
      ec = co_await flush_remote();
      if (ec != core::writes_lost_error() || round == kReplayRounds) break;
      ec = co_await send(0);
      remote_write_done(0, ec);
      if (ec) break;
    }
  }
  co_return ec;
}

ByteRange CacheLayer::cacheable_part(ByteRange range) const noexcept {
  const uint64_t first = chunk_of(range.offset), last = chunk_of(range.end() - 1);
  uint64_t lo = range.offset, hi = range.end();
  const auto covers_whole = [&](uint64_t c) {
    return range.offset <= chunk_start(c) && range.end() >= chunk_start(c) + chunk_len(c);
  };
  if (!present_.test(first) && !covers_whole(first)) lo = chunk_start(first) + chunk_len(first);
  if (!present_.test(last) && !covers_whole(last)) hi = chunk_start(last);
  return lo < hi ? ByteRange{lo, hi - lo} : ByteRange{range.offset, 0};
}

bool CacheLayer::owes_write_back(uint64_t first, uint64_t last) const noexcept {
  for (uint64_t c = first; c <= last; ++c)
    if (dirty_.test(c) || cleaning_.test(c) || dirty_persisted_.test(c)) return true;
  return false;
}

bool CacheLayer::drop_clean_chunks(uint64_t first, uint64_t last) noexcept {
  bool kept_dirty = false;
  for (uint64_t c = first; c <= last; ++c) {
    if (dirty_.test(c) || cleaning_.test(c)) {
      kept_dirty = true;
    } else {
      present_.clear(c);
      forget_replayable(c);
    }
  }
  return kept_dirty;
}

Task<std::error_code> CacheLayer::make_durable(uint64_t first, uint64_t last) {
  const auto m = mode();
  if (m == WriteMode::writeback_local) co_return co_await checkpoint(true);
  if (m == WriteMode::writeback) {
    // The FUA covers this request's data only; a loss of other writes is
    // the next FLUSH's to report.
    for (int round = 1;; ++round) {
      auto ec = co_await write_back_durably(first, last);
      if (ec != core::writes_lost_error() || round == kReplayRounds) co_return ec;
    }
  }
  co_return std::error_code{};
}

CacheLayer::WritebackFd::~WritebackFd() {
  if (fd >= 0) ::close(fd);
}

void CacheLayer::start_writeback(uint64_t offset, uint64_t length) {
  if (!writeback_fd_ || length == 0) return;
  boost::asio::post(blocking_, [f = writeback_fd_, offset, length] {
    (void)::sync_file_range(f->fd, static_cast<off64_t>(offset), static_cast<off64_t>(length), SYNC_FILE_RANGE_WRITE);
  });
}

Task<std::error_code> CacheLayer::flush() {
  InFlight inflight(*this);
  if (switching_.load(std::memory_order_seq_cst)) [[unlikely]]
    co_await wait_for_switch();
  if (local_.load(std::memory_order_acquire)) co_return co_await cache_file_->flush();
  const uint64_t last = nchunks_ ? nchunks_ - 1 : 0;
  // Chunks written in part before this FLUSH become present and dirty first.
  if (auto ec = co_await settle_deferred(0, last))
    co_return request_failed("flush", 0, 0, "fetching the rest of a partly written chunk", ec);
  switch (mode()) {
    case WriteMode::writethrough: co_return co_await durable_on_remote(0, last, true);
    case WriteMode::writeback_local:
      if (auto ec = co_await checkpoint(true)) co_return ec;
      co_return take_sticky_loss();
    case WriteMode::writeback: co_return co_await durable_on_remote(0, last, false);
  }
  co_return std::error_code{};
}

Task<std::error_code> CacheLayer::durable_on_remote(uint64_t first, uint64_t last, bool always_flush) {
  std::error_code ec;
  for (int round = 1;; ++round) {
    // In writethrough only chunks inherited dirty (from a write-back mode,
    // or written again after a lost session) need a write-back; the clean
    // bits of chunks still persisted dirty are persisted too (after a power
    // loss the write-back would otherwise store the cache file's older bytes
    // over what this covers).
    ec = {};
    if (mode() != WriteMode::writethrough || dirty_.find_set(first) <= last || cleaning_.find_set(first) <= last ||
        dirty_persisted_.find_set(first) <= last)
      ec = co_await write_back_durably(first, last);
    // Nothing was written back, but the remote may still hold writes no
    // flush covered, which a client may have read: the FLUSH covers them.
    if (!ec && (always_flush || remote_flush_owed())) ec = co_await flush_remote();
    // Lost writes were marked dirty again: write them back on the new
    // session and flush once more.
    if (ec != core::writes_lost_error() || round == kReplayRounds) break;
  }
  if (ec) co_return ec;
  co_return take_sticky_loss();
}

Task<std::error_code> CacheLayer::zero_cached(ByteRange range, IoFlags flags, bool whole_chunks_only) {
  if (whole_chunks_only) {  // trim: only what covers whole chunks, the rest is advisory
    uint64_t start = (range.offset + cfg_.chunk_size - 1) & ~(cfg_.chunk_size - 1);
    uint64_t stop = range.end() == image_size() ? range.end() : range.end() & ~(cfg_.chunk_size - 1);
    if (stop <= start) co_return std::error_code{};
    range = {start, stop - start};
  }
  const std::function<Task<std::error_code>()> change = [&] { return zero_cache_file(range, flags); };
  co_return co_await change_cached(range, flags, whole_chunks_only ? "trim" : "write-zeroes", "zeroed", "zeroing",
                                   change);
}

Task<std::error_code> CacheLayer::zero(ByteRange range, IoFlags flags) {
  if (range.length == 0) co_return std::error_code{};
  InFlight inflight(*this);
  if (switching_.load(std::memory_order_seq_cst)) [[unlikely]]
    co_await wait_for_switch();
  if (local_.load(std::memory_order_acquire)) co_return co_await local_zero(range, flags);
  if (mode() != WriteMode::writethrough) co_return co_await zero_cached(range, flags, false);
  // After a switch from a write-back mode, a client may still zero what this
  // remote cannot zero natively.
  if (remote_caps_.zero != Support::native) co_return co_await zero_through_by_writes(range, flags);
  const uint64_t first = chunk_of(range.offset), last = chunk_of(range.end() - 1);
  RegionWrites guard(*this, first, last);
  if (!intent_held(intent_, intent_persisted_, first, last, kChunksPerRegion))
    if (auto ec = co_await ensure_intent(first, last)) co_return ec;
  mark_remote_written(first, last);
  auto [fill, mine] = co_await claim(first, last, true);
  const uint64_t begun = remote_write_begin();
  auto ec = co_await remote_change(
      [&](IoFlags f) { return next().zero(range, (flags & ~core::kFua) | f); }, flags);
  const std::error_code remote_ec = ec;
  if (ec) {
    drop_clean_chunks(first, last);  // as a failed write_through
    request_failed("write-zeroes", range.length, range.offset, "zeroing at the remote", ec);
  }
  if (!ec) {
    if (auto cec = co_await cache_file_->zero(range, 0)) {
      if (drop_clean_chunks(first, last)) ec = cec;  // cannot mirror it: forget it
    } else {
      for (uint64_t c : mine)
        if (range.offset <= chunk_start(c) && range.end() >= chunk_start(c) + chunk_len(c)) present_.set(c);
      if ((flags & core::kFua) && owes_write_back(first, last)) ec = co_await cache_file_->flush();
    }
  }
  remote_write_end(first, last, begun, present_.all_set(first, last), remote_ec, flags & core::kFua);
  release(fill, mine, ec);
  co_return ec;
}

Task<std::error_code> CacheLayer::trim(ByteRange range, IoFlags flags) {
  if (range.length == 0) co_return std::error_code{};
  InFlight inflight(*this);
  if (switching_.load(std::memory_order_seq_cst)) [[unlikely]]
    co_await wait_for_switch();
  if (local_.load(std::memory_order_acquire)) {
    auto ec = co_await cache_file_->trim(range, 0);
    if (ec == std::errc::not_supported || ec == std::errc::operation_not_supported) ec = {};  // advisory
    if (!ec && (flags & core::kFua)) ec = co_await cache_file_->flush();
    co_return ec;
  }
  if (mode() != WriteMode::writethrough) co_return co_await zero_cached(range, flags, true);
  // Trim is advisory: a remote without it (after a switch from a write-back
  // mode, which offered trim) simply keeps its data.
  if (remote_caps_.trim != Support::native) co_return std::error_code{};
  const uint64_t first = chunk_of(range.offset), last = chunk_of(range.end() - 1);
  RegionWrites guard(*this, first, last);
  if (!intent_held(intent_, intent_persisted_, first, last, kChunksPerRegion))
    if (auto ec = co_await ensure_intent(first, last)) co_return ec;
  mark_remote_written(first, last);
  auto [fill, mine] = co_await claim(first, last, true);  // no fill may race with the trim
  auto ec = co_await remote_change([&](IoFlags f) { return next().trim(range, f); }, flags);
  // What the remote now returns there is its business: fetch it again. A
  // chunk that is still dirty (inherited from a write-back mode) keeps its
  // bytes, and is written back again: refetching it would lose the rest of
  // its dirty data, and a trim leaves the trimmed contents undefined anyway.
  for (uint64_t c = first; c <= last; ++c) {
    if (dirty_.test(c) || cleaning_.test(c)) {
      dirty_.set(c);
    } else {
      present_.clear(c);
      forget_replayable(c);
    }
  }
  release(fill, mine, ec);
  co_return ec;
}

Task<std::error_code> CacheLayer::prefetch(ByteRange range) {
  if (range.length == 0) co_return std::error_code{};
  InFlight inflight(*this);
  if (switching_.load(std::memory_order_seq_cst)) [[unlikely]]
    co_await wait_for_switch();
  if (local_.load(std::memory_order_acquire)) co_return std::error_code{};
  co_return co_await populate(chunk_of(range.offset), chunk_of(range.end() - 1));
}

Task<std::error_code> CacheLayer::block_status(ByteRange range, core::ExtentList& out) {
  InFlight inflight(*this);
  if (switching_.load(std::memory_order_seq_cst)) [[unlikely]]
    co_await wait_for_switch();
  if (local_.load(std::memory_order_acquire)) co_return co_await cache_file_->block_status(range, out);
  core::ExtentList remote;
  if (auto ec = co_await next().block_status(range, remote)) co_return ec;
  // The remote does not know about dirty chunks yet: they are data. Also in
  // writethrough, which inherits them from a write-back mode (an earlier run,
  // or set_mode while it writes them back).
  auto push = [&](uint64_t len, uint32_t flags) {
    if (len == 0) return;
    if (!out.empty() && out.back().flags == flags)
      out.back().length += len;
    else
      out.push_back({len, flags});
  };
  uint64_t pos = range.offset;
  for (const auto& e : remote) {
    const uint64_t end = std::min(pos + e.length, range.end());
    if (e.flags == 0) {
      push(end - pos, 0);
    } else {
      while (pos < end) {
        const uint64_t c = chunk_of(pos);
        const uint64_t cend = std::min(end, chunk_start(c) + chunk_len(c));
        push(cend - pos, (dirty_.test(c) || cleaning_.test(c)) ? 0 : e.flags);
        pos = cend;
      }
    }
    pos = end;
    if (pos >= range.end()) break;
  }
  co_return std::error_code{};
}

Task<std::error_code> CacheLayer::cache_status(ByteRange range, core::ExtentList& out) {
  out.clear();
  if (range.length == 0) co_return errno_code(EINVAL);
  uint64_t pos = range.offset;
  while (pos < range.end() && out.size() < 1024) {
    const uint64_t c = chunk_of(pos);
    const uint64_t cend = std::min(range.end(), chunk_start(c) + chunk_len(c));
    const uint32_t flags = (present_.test(c) ? 1u : 0u) | ((dirty_.test(c) || cleaning_.test(c)) ? 2u : 0u);
    if (!out.empty() && out.back().flags == flags)
      out.back().length += cend - pos;
    else
      out.push_back({cend - pos, flags});
    pos = cend;
  }
  co_return std::error_code{};
}

}  // namespace blockway::cache
