// CacheLayer: claims on chunks and filling absent ones from the remote
// (reads, readahead, the prefetcher's fills).
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include "core/buffer_pool.hpp"
#include "core/logging.hpp"

#include <boost/asio/co_spawn.hpp>

#include <algorithm>
#include <bit>
#include <cstring>

namespace blockway::cache {

// ---- population of absent chunks -------------------------------------------

Task<std::pair<std::shared_ptr<CacheLayer::Fill>, std::vector<uint64_t>>> CacheLayer::claim(uint64_t first,
                                                                                             uint64_t last,
                                                                                             bool present_too,
                                                                                             DeferredSeen* deferred_seen) {
  std::shared_ptr<Fill> fill;  // allocated on the first claim: hits need none
  std::vector<uint64_t> mine;
  uint64_t c = first;
  // Chunks are claimed in increasing order, so two claimers never wait for
  // each other in a cycle.
  while (c <= last) {
    if (!present_too && present_.test(c)) {
      ++c;
      continue;
    }
    std::shared_ptr<Fill> other;
    {
      auto& s = shard(c);
      std::lock_guard lock(s.mutex);
      if (present_too || !present_.test(c)) {
        // The Fill is made only when a chunk is taken: a write that joins a
        // deferred fill (a sequential writer's usual case) allocates none.
        if (auto it = s.fills.find(c); it != s.fills.end()) {
          if (it->second != fill) other = it->second;
        } else {
          if (!fill) fill = std::make_shared<Fill>();
          s.fills.emplace(c, fill);
          mine.push_back(c);
        }
      }
    }
    if (other && deferred_seen && other->deferred) {
      // A deferred fill: the caller (a write) joins it instead of waiting.
      if (std::none_of(deferred_seen->begin(), deferred_seen->end(), [&](const auto& e) { return e.first == c; }))
        deferred_seen->emplace_back(c, std::move(other));
      ++c;
      continue;
    }
    if (other) {
      // Then look at chunk c again. The wait does not own the other Fill, so
      // that this frame and it never keep each other alive (see wait_unowned).
      core::SharedEvent* done = &other->done;
      std::shared_ptr<core::SharedEvent> event(std::move(other), done);
      auto waiting = core::SharedEvent::wait_unowned(std::move(event));
      co_await std::move(waiting);
      continue;
    }
    ++c;
  }
  co_return std::make_pair(fill, std::move(mine));
}

void CacheLayer::release(const std::shared_ptr<Fill>& fill, const std::vector<uint64_t>& chunks, std::error_code ec) {
  if (!fill) return;
  for (uint64_t c : chunks) {
    auto& s = shard(c);
    std::lock_guard lock(s.mutex);
    auto it = s.fills.find(c);
    if (it != s.fills.end() && it->second == fill) s.fills.erase(it);
  }
  fill->done.set(ec);
}

namespace {
// The largest single write of fetched bytes into the cache file (see fetch_run).
constexpr size_t kFillWritePiece = 64 * 1024;
}  // namespace

Task<std::error_code> CacheLayer::fetch_run(uint64_t first, uint64_t last, core::IoFlags flags,
                                            std::span<std::byte> out, uint64_t out_offset) {
  const uint64_t off = chunk_start(first);
  const uint64_t len = chunk_start(last) + chunk_len(last) - off;
  // A read miss whose reply holds the whole run gets the bytes straight from
  // the remote, and the cache file is written from the reply buffer: each
  // byte is copied once less than through a fetch buffer, and the reply
  // never reads back what was just written (the profile of a cold nbdcopy:
  // the preadv2 after the fill was 21 % of the daemon's CPU).
  core::IoBuffer own;
  std::span<std::byte> into;
  if (!out.empty() && out_offset == off && out.size() == len) {
    into = out;
  } else {
    own = core::IoBuffer(len);  // pooled: warm pages, no faults
    into = own.span();
  }
  if (auto ec = co_await fetch_bytes(into, off, flags)) co_return ec;
  // The chunk becomes present only once the cache file holds its bytes (a
  // reader waiting on the claim then reads them there): the write stays
  // before present_.set, as the checkpoint's ordering needs (DESIGN.md,
  // invariant 3: the fdatasync that precedes persisting a present bit must
  // follow the write; a direct write is on the disk when it returns, and the
  // same fdatasync makes its block allocation durable).
  if (auto ec = co_await write_fill(into, off, into.data() == out.data())) {
    log_->error("export '{}': writing the cache file failed: {}", name_, ec.message());
    co_return ec;
  }
  if (!out.empty() && into.data() != out.data())
    std::memcpy(out.data(), into.data() + (out_offset - off), out.size());
  for (uint64_t c = first; c <= last; ++c) present_.set(c);
  fetched_.fetch_add(len, std::memory_order_relaxed);
  co_return std::error_code{};
}

namespace {
// 4 KiB: the largest logical block size of the disks a cache lives on, so
// an O_DIRECT write aligned to it is aligned for all of them.
constexpr uint64_t kDirectAlign = 4096;
}  // namespace

Task<std::error_code> CacheLayer::write_fill(std::span<const std::byte> bytes, uint64_t off, bool reply_has_it) {
  if (reply_has_it && direct_ && direct_fills_.load(std::memory_order_relaxed) && off % kDirectAlign == 0 &&
      bytes.size() % kDirectAlign == 0 && reinterpret_cast<uintptr_t>(bytes.data()) % kDirectAlign == 0) {
    // The claim on the run keeps every buffered reader and writer of the
    // cache file out of these pages meanwhile (hits read present chunks
    // only; chunks are 4 KiB multiples, so no page is shared with another
    // chunk), and the kernel drops any page cached for the range around the
    // write. The chunk becomes present after it completes, as a buffered one.
    auto ec = co_await direct_->write(bytes, off);
    if (!ec) co_return ec;
    if (ec == std::errc::invalid_argument) {
      // The file system wants another alignment: buffered from now on.
      if (direct_fills_.exchange(false))
        log_->info("export '{}': O_DIRECT writes to {} refused (EINVAL): fills go through the page cache", name_,
                   cache_path_);
    } else {
      log_->debug("export '{}': direct write of {} bytes at {} failed ({}): writing through the page cache", name_,
                  bytes.size(), off, ec.message());
    }
    // The same bytes again, buffered (whatever part was written is overwritten).
  }
  // In pieces of at most kFillWritePiece: a buffered write makes page-cache
  // folios as large as itself, and a later 4 KiB write into a large folio
  // walks every buffer head of it in the kernel (ext4_block_write_begin:
  // 54-70 % of the CPU at cached 4 KiB random writes after a 1 MiB fill;
  // bench/page_cache_folios.py: 2.5 / 4.1 / 17.4 / 41 us per 4 KiB write into
  // pages filled by 4 KiB / 64 KiB / 1 MiB / 4 MiB writes).
  for (size_t pos = 0; pos < bytes.size(); pos += kFillWritePiece) {
    const size_t n = std::min<size_t>(kFillWritePiece, bytes.size() - pos);
    if (auto ec = co_await cache_file_->write(bytes.subspan(pos, n), off + pos, 0)) co_return ec;
  }
  co_return std::error_code{};
}

Task<std::error_code> CacheLayer::fetch_bytes(std::span<std::byte> into, uint64_t off, core::IoFlags flags) {
  const uint64_t step = std::max<uint64_t>(geometry_.max_transfer / geometry_.min_block * geometry_.min_block,
                                           geometry_.min_block);
  for (uint64_t done = 0; done < into.size();) {
    const uint64_t n = std::min<uint64_t>(step, into.size() - done);
    if (auto ec = co_await next().read(into.subspan(done, n), off + done, flags)) {
      fetch_errors_.fetch_add(1, std::memory_order_relaxed);
      log_->debug("export '{}': fetch of {} bytes at {} failed: {}", name_, n, off + done, ec.message());
      co_return ec;
    }
    done += n;
  }
  co_return std::error_code{};
}

Task<std::error_code> CacheLayer::fetch_absent(const std::vector<uint64_t>& mine) {
  const uint64_t max_chunks = std::max<uint64_t>(1, kMaxRun >> chunk_shift_);
  for (size_t i = 0; i < mine.size();) {
    if (present_.test(mine[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j + 1 < mine.size() && mine[j + 1] == mine[j] + 1 && !present_.test(mine[j + 1]) &&
           j + 1 - i < max_chunks)
      ++j;
    if (auto ec = co_await fetch_run(mine[i], mine[j])) co_return ec;
    i = j + 1;
  }
  co_return std::error_code{};
}

Task<std::error_code> CacheLayer::populate(uint64_t first, uint64_t last) {
  // Only this populator's own fetches can fail it: a chunk whose fill by
  // someone else failed is claimed and fetched here (claim() looks at it
  // again). A chunk may be absent again afterwards (evicted, or dropped by a
  // writethrough change), which is not an error: callers that need chunks to
  // stay hold a claim on them instead (read_miss, write_cached).
  auto [fill, mine] = co_await claim(first, last);
  auto ec = co_await fetch_absent(mine);
  release(fill, mine, ec);
  co_return ec;
}

void CacheLayer::start_readahead(uint64_t after) {
  if (cfg_.readahead_chunks == 0 || after >= nchunks_) return;
  const uint64_t last = std::min(nchunks_ - 1, after + cfg_.readahead_chunks - 1);
  if (present_.all_set(after, last)) return;
  // At most two read-aheads at a time; close() waits for them.
  if (readaheads_.fetch_add(1) >= 2 || stopping_.load()) {
    readaheads_.fetch_sub(1);
    return;
  }
  boost::asio::co_spawn(
      background_,
      [this, after, last]() -> Task<void> {
        if (auto ec = co_await populate(after, last)) log_->debug("export '{}': read-ahead failed: {}", name_, ec.message());
      },
      [this](std::exception_ptr) { readaheads_.fetch_sub(1); });
}

// ---- prefetch support ----------------------------------------------------------------

void CacheLayer::mark_remote_written(uint64_t first, uint64_t last) noexcept {
  for (uint64_t c = first; c <= last && c < nchunks_; ++c)
    if (!no_hole_.test(c)) no_hole_.set(c);
}

uint64_t CacheLayer::chunks_bytes(uint64_t n) const noexcept { return std::min(image_size(), n << chunk_shift_); }

uint64_t CacheLayer::dirty_chunks() const noexcept {
  uint64_t n = 0;
  for (size_t i = 0; i < dirty_.word_count(); ++i) n += std::popcount(dirty_.word(i) | cleaning_.word(i));
  return n;
}

void CacheLayer::record_first_reads(uint64_t first, uint64_t last) {
  uint32_t fresh[64];
  size_t n = 0;
  for (uint64_t c = first; c <= last && n < 64; ++c)
    if (c <= UINT32_MAX && !seen_.test(c) && !seen_.set(c)) fresh[n++] = static_cast<uint32_t>(c);
  if (n == 0) return;
  std::lock_guard lock(profile_mutex_);
  for (size_t i = 0; i < n && profile_.size() < kMaxProfile; ++i) profile_.push_back(fresh[i]);
}

Task<std::error_code> CacheLayer::zero_cache_file(ByteRange range, IoFlags flags) {
  auto ec = co_await cache_file_->zero(range, flags & core::kNoHole);
  if (ec == std::errc::not_supported || ec == std::errc::operation_not_supported) {
    static const std::vector<std::byte> zeroes(1u << 20);
    ec = {};
    for (uint64_t pos = 0; pos < range.length && !ec;) {
      const uint64_t n = std::min<uint64_t>(zeroes.size(), range.length - pos);
      ec = co_await cache_file_->write({zeroes.data(), n}, range.offset + pos, 0);
      pos += n;
    }
  }
  co_return ec;
}

Task<std::error_code> CacheLayer::prefetch_fill(uint64_t first, uint64_t last, uint64_t* fetched) {
  // The same claims as a read miss: a chunk a client is fetching or writing
  // is waited for, then skipped (it is present).
  auto [fill, mine] = co_await claim(first, last);
  std::error_code ec;
  for (size_t i = 0; i < mine.size() && !ec;) {
    // Whether a chunk is a hole is decided under the claim: a writethrough
    // write marks no_hole_ before it claims, so a chunk seen as a hole here
    // cannot have been written at the remote yet.
    const bool hole = is_hole(mine[i]);
    size_t j = i;
    while (j + 1 < mine.size() && mine[j + 1] == mine[j] + 1 && is_hole(mine[j + 1]) == hole) ++j;
    const uint64_t off = chunk_start(mine[i]);
    const uint64_t len = chunk_start(mine[j]) + chunk_len(mine[j]) - off;
    if (hole) {
      // The remote reads zero here: zero the cache file (a stale copy may
      // remain from before an unclean stop) and mark present, like a fill.
      ec = co_await zero_cache_file({off, len}, cfg_.preallocate ? core::kNoHole : 0);
      if (!ec)
        for (uint64_t c = mine[i]; c <= mine[j]; ++c) present_.set(c);
    } else {
      ec = co_await fetch_run(mine[i], mine[j], core::kBackground);
      if (!ec && fetched) *fetched += len;
    }
    i = j + 1;
  }
  release(fill, mine, ec);
  co_return ec;
}

}  // namespace blockway::cache
