#include "cache/cache_layer.hpp"

#include "cache/prefetcher.hpp"

#include "core/buffer_pool.hpp"
#include "core/logging.hpp"
#include "core/remote_device.hpp"
#include "remote/file/file_device.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>
#include <stdexcept>

namespace blockway::cache {

using core::ByteRange;
using core::errno_code;
using core::IoFlags;
using core::Support;
using core::Task;

namespace {

// Largest single remote request of a fill or a write-back.
constexpr uint64_t kMaxRun = 1u << 20;

bool all_zero(const std::byte* p, size_t n) {
  if (n == 0) return true;
  const size_t head = std::min<size_t>(n, 16);
  for (size_t i = 0; i < head; ++i)
    if (p[i] != std::byte{0}) return false;
  return n <= 16 || std::memcmp(p, p + 16, n - 16) == 0;
}

std::string file_name_for(const std::string& export_name) {
  std::string out;
  for (char c : export_name)
    out.push_back(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' ? c : '_');
  return out + ".img";
}

}  // namespace

struct CacheLayer::Fill {
  core::SharedEvent done;
};

// Counts writes in progress per region while it lives, and marks the regions
// touched when it ends, so a checkpoint keeps their write-intent.
class CacheLayer::RegionWrites {
 public:
  RegionWrites(CacheLayer& c, uint64_t first_chunk, uint64_t last_chunk)
      : c_(c), r0_(first_chunk / kChunksPerRegion), r1_(last_chunk / kChunksPerRegion) {
    for (uint64_t r = r0_; r <= r1_; ++r) c_.region_writes_[r].fetch_add(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  ~RegionWrites() {
    for (uint64_t r = r0_; r <= r1_; ++r) {
      c_.touched_.set(r);
      c_.region_writes_[r].fetch_sub(1, std::memory_order_seq_cst);
    }
  }
  RegionWrites(const RegionWrites&) = delete;
  RegionWrites& operator=(const RegionWrites&) = delete;

 private:
  CacheLayer& c_;
  uint64_t r0_, r1_;
};

class CacheLayer::EpochGuard {
 public:
  explicit EpochGuard(CacheLayer& c) : c_(c.capacity_chunks_ ? &c : nullptr) {
    if (!c_) return;
    // Register in the epoch that is current *after* the count went up: a
    // count added to an epoch that eviction already left (a stale load) is
    // waited for by nobody, and the reader could then read a chunk while it
    // is punched out of the cache file.
    for (;;) {
      e_ = c_->epoch_.load(std::memory_order_seq_cst);
      c_->epoch_active_[e_].fetch_add(1, std::memory_order_seq_cst);
      if (c_->epoch_.load(std::memory_order_seq_cst) == e_) break;
      c_->epoch_active_[e_].fetch_sub(1, std::memory_order_seq_cst);
    }
  }
  ~EpochGuard() {
    if (c_) c_->epoch_active_[e_].fetch_sub(1, std::memory_order_seq_cst);
  }
  EpochGuard(const EpochGuard&) = delete;
  EpochGuard& operator=(const EpochGuard&) = delete;

 private:
  CacheLayer* c_;
  uint32_t e_ = 0;
};

// Counts a client request in flight while it lives (detach and set_mode wait
// for none), and notes when the last one ended (the prefetcher's yield).
class CacheLayer::InFlight {
 public:
  explicit InFlight(CacheLayer& c) : c_(c) { c_.inflight_.fetch_add(1, std::memory_order_seq_cst); }
  ~InFlight() {
    c_.last_request_end_.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                               std::memory_order_relaxed);
    c_.inflight_.fetch_sub(1, std::memory_order_seq_cst);
  }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

 private:
  CacheLayer& c_;
};

CacheLayer::CacheLayer(std::unique_ptr<core::BlockDevice> remote, Params p)
    : Layer(std::move(remote)),
      name_(p.export_name),
      remote_uri_(p.remote_uri),
      cfg_(p.config),
      store_(*p.store),
      blocking_(*p.blocking),
      background_(p.background),
      log_(core::logger("cache")),
      geometry_(next().geometry()),
      remote_caps_(next().capabilities()) {
  chunk_shift_ = static_cast<unsigned>(std::countr_zero(cfg_.chunk_size));
  nchunks_ = (geometry_.size + cfg_.chunk_size - 1) >> chunk_shift_;
  nregions_ = (nchunks_ + kChunksPerRegion - 1) / kChunksPerRegion;
  mode_.store(cfg_.mode);
  for (auto* b : {&present_, &dirty_, &cleaning_, &dirty_persisted_, &holes_, &no_hole_, &seen_, &unflushed_[0].chunks,
                  &unflushed_[1].chunks})
    b->resize(nchunks_);
  for (auto* b : {&intent_, &intent_persisted_, &touched_}) b->resize(nregions_);
  region_writes_ = std::make_unique<std::atomic<uint32_t>[]>(nregions_ ? nregions_ : 1);
  for (uint64_t r = 0; r < nregions_; ++r) region_writes_[r].store(0);
  cache_path_ = cfg_.dir + "/" + file_name_for(name_);
  if (cfg_.capacity && cfg_.capacity < geometry_.size) {
    capacity_chunks_ = cfg_.capacity >> chunk_shift_;
    referenced_.resize(nchunks_);
  }

  std::error_code fs_ec;
  std::filesystem::create_directories(cfg_.dir, fs_ec);
  if (fs_ec) throw std::runtime_error("cannot create cache directory " + cfg_.dir + ": " + fs_ec.message());

  CacheRecord want{name_, remote_uri_, cache_path_, to_string(cfg_.mode), geometry_.size, cfg_.chunk_size, true};
  auto have = store_.find(name_);
  const bool injected = static_cast<bool>(p.open_cache_file);
  bool reuse = have && have->remote == want.remote && have->size == want.size &&
               have->chunk_size == want.chunk_size && have->cache_path == want.cache_path &&
               (injected || (std::filesystem::exists(cache_path_) &&
                             std::filesystem::file_size(cache_path_) == geometry_.size));
  if (have && !reuse && store_.get_state(name_, "detached").value_or("") == "1")
    // After a detach the cache file is the only up-to-date copy of the image
    // (local-mode writes are never dirty: there is no remote to owe them to).
    throw std::runtime_error("export '" + name_ + "' is detached (local mode) and its image is " + have->cache_path +
                             " (chunk size " + std::to_string(have->chunk_size) + ", remote " + have->remote +
                             "); the export's remote, chunk size or cache directory changed: restore them, or "
                             "serve the image itself with file://" + have->cache_path);
  if (have && !reuse) {
    // Never throw away data the remote does not have.
    const auto dirty = store_.load_bitmap(name_, BitmapKind::dirty, (have->size / have->chunk_size + 64) / 64 + 1);
    if (std::any_of(dirty.begin(), dirty.end(), [](uint64_t w) { return w != 0; }))
      throw std::runtime_error("export '" + name_ + "': the cache " + have->cache_path +
                               " holds data not yet written to " + have->remote +
                               ", but the remote, size, chunk size or cache file changed; restore the previous "
                               "settings so it can be written back");
    log_->warn("export '{}': cache settings or remote changed, starting with an empty cache", name_);
  }
  if (!reuse && injected) {
    store_.reset(want);
  } else if (!reuse) {
    ::unlink(cache_path_.c_str());
    const int fd = ::open(cache_path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) throw std::runtime_error("cannot create cache file " + cache_path_ + ": " + std::strerror(errno));
    int rc = ::ftruncate(fd, static_cast<off_t>(geometry_.size));
    if (rc == 0 && cfg_.preallocate) rc = ::posix_fallocate(fd, 0, static_cast<off_t>(geometry_.size));
    const int e = rc == 0 ? 0 : (rc > 0 ? rc : errno);
    ::fsync(fd);
    ::close(fd);
    if (e) throw std::runtime_error("cannot size cache file " + cache_path_ + ": " + std::strerror(e));
    store_.reset(want);
  }
  try {
    cache_file_ = injected ? p.open_cache_file(cache_path_)
                           : std::make_unique<remote::file::FileDevice>(cache_path_, false, blocking_);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("cache file: ") + e.what());
  }
  if (cache_file_->geometry().size < geometry_.size)
    throw std::runtime_error("cache file " + cache_path_ + " is smaller than the image");
  if (!injected) {
    const int fd = ::open(cache_path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      writeback_fd_ = std::make_shared<WritebackFd>();
      writeback_fd_->fd = fd;
    }
  }
  if (cache_file_->capabilities().read_only)
    throw std::runtime_error("cache file " + cache_path_ + " is not writable");

  auto load = [&](BitmapKind kind, AtomicBitmap& bm, std::vector<uint64_t>& saved) {
    saved = store_.load_bitmap(name_, kind, bm.word_count());
    for (size_t i = 0; i < saved.size(); ++i) bm.store_word(i, saved[i]);
  };
  load(BitmapKind::present, present_, saved_present_);
  load(BitmapKind::dirty, dirty_, saved_dirty_);
  for (size_t i = 0; i < saved_dirty_.size(); ++i) dirty_persisted_.store_word(i, saved_dirty_[i]);
  load(BitmapKind::intent, intent_, saved_intent_);
  for (size_t i = 0; i < intent_.word_count(); ++i) intent_persisted_.store_word(i, saved_intent_[i]);
  for (size_t i = 0; i < dirty_.word_count(); ++i)  // dirty implies present
    present_.store_word(i, present_.word(i) | dirty_.word(i));

  if (reuse && store_.get_state(name_, "detached").value_or("") == "1") {
    // Local mode: the cache file is the image. Nothing may be dropped (there
    // is no remote to fetch it from again), and every chunk is present.
    local_.store(true);
    for (uint64_t c = 0; c < nchunks_; ++c) present_.set(c);
    for (size_t i = 0; i < dirty_.word_count(); ++i) dirty_.store_word(i, 0);
    recovered_ = !have->clean;
  } else {
    if (reuse && !have->clean) {
      recover_after_unclean_stop();
      if (!injected) punch_absent_chunks();
    }
    session_ = store_.begin_session(name_);
  }
  if (reuse && have->mode != want.mode) store_.set_mode(name_, want.mode);
  store_.set_clean(name_, false);  // until a clean close
  prefetcher_ = std::make_unique<Prefetcher>(*this);
  log_->info("export '{}': {} cache {} ({} chunks of {} KiB, {} present, {} dirty{})", name_,
             local_ ? std::string("local (detached)") : to_string(cfg_.mode),
             cache_path_, nchunks_, cfg_.chunk_size >> 10, present_.count(), dirty_.count(),
             recovered_ ? ", recovered after an unclean stop" : "");
}

CacheLayer::~CacheLayer() = default;

void CacheLayer::recover_after_unclean_stop() {
  // A region with persisted write-intent may hold cache data that never became
  // durable or never reached the remote: every present chunk there that is
  // not persisted dirty is dropped and will be fetched again.
  uint64_t dropped = 0;
  for (uint64_t r = 0; r < nregions_; ++r) {
    if (!intent_.test(r)) continue;
    const uint64_t first = r * kChunksPerRegion;
    const uint64_t last = std::min(nchunks_, first + kChunksPerRegion) - 1;
    for (uint64_t c = first; c <= last; ++c)
      if (present_.test(c) && !dirty_.test(c)) {
        present_.clear(c);
        ++dropped;
      }
  }
  std::vector<MetaStore::PageWrite> pages;
  auto add_all = [&](BitmapKind kind, AtomicBitmap& bm, std::vector<uint64_t>& saved) {
    for (size_t i = 0; i < bm.word_count(); ++i) saved[i] = bm.word(i);
    for (size_t first = 0; first < saved.size(); first += MetaStore::kWordsPerPage) {
      const size_t n = std::min(MetaStore::kWordsPerPage, saved.size() - first);
      pages.push_back({kind, static_cast<uint32_t>(first / MetaStore::kWordsPerPage),
                       std::vector<uint64_t>(saved.begin() + static_cast<long>(first),
                                             saved.begin() + static_cast<long>(first + n))});
    }
  };
  // The intents stay until the first checkpoint after new writes: clearing
  // them here is safe only together with the present bits just dropped.
  add_all(BitmapKind::present, present_, saved_present_);
  for (size_t i = 0; i < intent_.word_count(); ++i) intent_.store_word(i, 0);
  add_all(BitmapKind::intent, intent_, saved_intent_);
  for (size_t i = 0; i < intent_.word_count(); ++i) intent_persisted_.store_word(i, 0);
  store_.commit(name_, pages, std::nullopt);
  recovered_ = true;
  log_->warn("export '{}': recovered after an unclean stop: {} chunks dropped, {} dirty chunks kept", name_, dropped,
             dirty_.count());
}

void CacheLayer::punch_absent_chunks() {
  // Bytes of absent chunks are never read, but take disk space that eviction
  // (which looks only at present chunks) would never free: chunks dropped
  // just now, or evicted by a run that stopped between persisting the cleared
  // present bit and punching. One fallocate per run of absent chunks.
  const int fd = ::open(cache_path_.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return;
  uint64_t punched = 0;
  for (uint64_t c = present_.find_clear(0); c < nchunks_;) {
    const uint64_t next_present = std::min(present_.find_set(c), nchunks_);
    const uint64_t off = chunk_start(c), len = chunk_start(next_present - 1) + chunk_len(next_present - 1) - off;
    if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                    static_cast<off_t>(len)) != 0) {
      log_->debug("export '{}': punching absent chunks failed: {}", name_, std::strerror(errno));
      break;
    }
    punched += len;
    c = next_present >= nchunks_ ? nchunks_ : present_.find_clear(next_present);
  }
  ::close(fd);
  log_->debug("export '{}': punched {} bytes of absent chunks out of the cache file", name_, punched);
}

uint64_t CacheLayer::chunk_len(uint64_t c) const noexcept {
  const uint64_t start = chunk_start(c);
  return std::min<uint64_t>(cfg_.chunk_size, geometry_.size - start);
}

core::Capabilities CacheLayer::capabilities() const noexcept {
  if (local_.load(std::memory_order_acquire)) {
    core::Capabilities c;
    c.flush = c.fua = c.trim = c.zero = c.extents = c.prefetch = Support::native;
    c.multi_conn = true;
    return c;
  }
  auto c = remote_caps_;
  c.flush = Support::native;
  c.fua = Support::native;
  c.prefetch = Support::native;
  c.multi_conn = true;  // one cache for every connection
  if (mode() != WriteMode::writethrough) {
    c.trim = Support::native;
    c.zero = Support::native;
  } else {
    c.trim = remote_caps_.trim == Support::native ? Support::native : Support::none;
    c.zero = remote_caps_.zero == Support::native ? Support::native : Support::none;
  }
  c.extents = remote_caps_.extents == Support::native ? Support::native : Support::none;
  return c;
}

std::string CacheLayer::describe() const {
  if (local_.load(std::memory_order_acquire)) return "local image " + cache_path_ + " (detached from " + remote_uri_ + ")";
  return "cache(" + to_string(mode()) + ", " + cache_path_ + ") over " + next().describe();
}

// ---- population of absent chunks -------------------------------------------

Task<std::pair<std::shared_ptr<CacheLayer::Fill>, std::vector<uint64_t>>> CacheLayer::claim(uint64_t first,
                                                                                             uint64_t last,
                                                                                             bool present_too) {
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
    if (!fill) fill = std::make_shared<Fill>();
    std::shared_ptr<Fill> other;
    {
      auto& s = shard(c);
      std::lock_guard lock(s.mutex);
      if (present_too || !present_.test(c)) {
        auto [it, inserted] = s.fills.try_emplace(c, fill);
        if (inserted)
          mine.push_back(c);
        else if (it->second != fill)
          other = it->second;
      }
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

Task<std::error_code> CacheLayer::fetch_run(uint64_t first, uint64_t last) {
  const uint64_t off = chunk_start(first);
  const uint64_t len = chunk_start(last) + chunk_len(last) - off;
  core::IoBuffer buf(len);
  const uint64_t step = std::max<uint64_t>(geometry_.max_transfer / geometry_.min_block * geometry_.min_block,
                                           geometry_.min_block);
  for (uint64_t done = 0; done < len;) {
    const uint64_t n = std::min(step, len - done);
    if (auto ec = co_await next().read(buf.span().subspan(done, n), off + done, 0)) {
      fetch_errors_.fetch_add(1, std::memory_order_relaxed);
      log_->debug("export '{}': fetch of {} bytes at {} failed: {}", name_, n, off + done, ec.message());
      co_return ec;
    }
    done += n;
  }
  if (auto ec = co_await cache_file_->write(buf.span(), off, 0)) {
    log_->error("export '{}': writing the cache file failed: {}", name_, ec.message());
    co_return ec;
  }
  for (uint64_t c = first; c <= last; ++c) present_.set(c);
  fetched_.fetch_add(len, std::memory_order_relaxed);
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

Task<std::error_code> CacheLayer::read(std::span<std::byte> buf, uint64_t offset, IoFlags) {
  if (buf.empty()) co_return std::error_code{};
  InFlight inflight(*this);
  if (switching_.load(std::memory_order_seq_cst)) [[unlikely]]
    co_await wait_for_switch();
  if (local_.load(std::memory_order_acquire)) co_return co_await cache_file_->read(buf, offset, 0);
  const uint64_t first = chunk_of(offset), last = chunk_of(offset + buf.size() - 1);
  if (!seen_.test(first) || !seen_.test(last)) record_first_reads(first, last);
  {
    // Hit: no claim, only the eviction grace period.
    EpochGuard guard(*this);
    if (present_.all_set(first, last)) {
      hits_.fetch_add(1, std::memory_order_relaxed);
      mark_referenced(first, last);
      auto ec = co_await cache_file_->read(buf, offset, 0);
      if (ec) co_return request_failed("read", buf.size(), offset, "reading the cache file", ec);
      co_return ec;
    }
  }
  misses_.fetch_add(1, std::memory_order_relaxed);
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
  std::error_code ec = co_await fetch_absent(mine);
  if (ec) {
    request_failed("read", buf.size(), offset, "fetching from the remote", ec);
  } else {
    mark_referenced(first, last);
    ec = co_await cache_file_->read(buf, offset, 0);
    if (ec) request_failed("read", buf.size(), offset, "reading the cache file", ec);
  }
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

Task<std::error_code> CacheLayer::write_cached(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  const uint64_t end = offset + buf.size();
  const uint64_t first = chunk_of(offset), last = chunk_of(end - 1);
  RegionWrites guard(*this, first, last);
  if (auto ec = co_await ensure_intent(first, last)) co_return request_failed("write", buf.size(), offset, "persisting the write intent", ec);
  std::error_code ec;
  for (int attempt = 0;; ++attempt) {
    // Absent chunks are claimed (no fill may store older bytes over this
    // write); present ones only after two rounds lost one of them to
    // eviction, and then no eviction can take them.
    auto [fill, mine] = co_await claim(first, last, attempt >= kClaimAllAfter);
    if (auto pec = co_await fetch_partial_ends({offset, buf.size()}, mine)) {
      release(fill, mine, pec);
      co_return request_failed("write", buf.size(), offset, "fetching the rest of a partly written chunk", pec);
    }
    bool done = false;
    {
      EpochGuard guard(*this);
      // Eviction may have taken a chunk since it was checked: then start over.
      done = chunks_ready(first, last, mine);
      if (done) {
        ec = co_await cache_file_->write(buf, offset, 0);
        if (!ec) {
          for (uint64_t c = first; c <= last; ++c) dirty_.set(c);
          for (uint64_t c : mine) present_.set(c);
        } else {
          // Part of the write may be in the cache file: a clean chunk must not
          // keep bytes the remote does not have. (A dirty one is the client's
          // failed write to undefined contents, and stays dirty.)
          for (uint64_t c = first; c <= last; ++c)
            if (!dirty_.test(c) && !cleaning_.test(c)) {
              present_.clear(c);
              forget_replayable(c);
            }
        }
      }
    }
    release(fill, mine, ec);
    if (done) break;
  }
  if (ec) co_return request_failed("write", buf.size(), offset, "writing the cache file", ec);
  if (flags & core::kFua) co_return co_await make_durable(first, last);
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
    uint64_t stop = range.end() == geometry_.size ? range.end() : range.end() & ~(cfg_.chunk_size - 1);
    if (stop <= start) co_return std::error_code{};
    range = {start, stop - start};
  }
  const uint64_t first = chunk_of(range.offset), last = chunk_of(range.end() - 1);
  RegionWrites guard(*this, first, last);
  const char* what = whole_chunks_only ? "trim" : "write-zeroes";
  if (auto ec = co_await ensure_intent(first, last))
    co_return request_failed(what, range.length, range.offset, "persisting the write intent", ec);
  std::error_code ec;
  for (int attempt = 0;; ++attempt) {
    auto [fill, mine] = co_await claim(first, last, attempt >= kClaimAllAfter);  // as write_cached
    if (auto pec = co_await fetch_partial_ends(range, mine)) {
      release(fill, mine, pec);
      co_return request_failed(what, range.length, range.offset, "fetching the rest of a partly zeroed chunk", pec);
    }
    bool done = false;
    {
      EpochGuard guard(*this);
      done = chunks_ready(first, last, mine);
      if (done) {
        ec = co_await zero_cache_file(range, flags);
        if (!ec) {
          for (uint64_t c = first; c <= last; ++c) dirty_.set(c);
          for (uint64_t c : mine) present_.set(c);
        } else {
          // As a failed write: a clean chunk must not keep zeroes the remote
          // does not have.
          for (uint64_t c = first; c <= last; ++c)
            if (!dirty_.test(c) && !cleaning_.test(c)) {
              present_.clear(c);
              forget_replayable(c);
            }
        }
      }
    }
    release(fill, mine, ec);
    if (done) break;
  }
  if (ec) co_return request_failed(what, range.length, range.offset, "zeroing the cache file", ec);
  if (flags & core::kFua) co_return co_await make_durable(first, last);
  co_return std::error_code{};
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

// ---- write-back ----------------------------------------------------------------

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
  core::IoBuffer buf(len);
  const uint64_t begun = remote_write_begin();
  auto ec = co_await cache_file_->read(buf.span(), off, 0);
  if (!ec) {
    if (remote_caps_.zero == Support::native && all_zero(buf.data(), len)) {
      ec = co_await next().zero({off, len}, 0);  // keeps the remote sparse
      if (ec == std::errc::not_supported || ec == std::errc::operation_not_supported)
        ec = co_await next().write(buf.span(), off, 0);
    } else {
      ec = co_await next().write(buf.span(), off, 0);
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

// ---- checkpoints ------------------------------------------------------------------

Task<std::error_code> CacheLayer::checkpoint(bool sync_data) {
  const uint64_t ticket = checkpoint_requested_.fetch_add(1, std::memory_order_acq_rel) + 1;
  auto guard = co_await checkpoint_mutex_.lock();
  // Group commit: a checkpoint that started after this request covers it.
  if (checkpoint_done_ >= ticket && (!sync_data || checkpoint_done_sync_.load() >= ticket)) co_return std::error_code{};
  co_return co_await run_checkpoint(sync_data);
}

void CacheLayer::add_changed_pages(BitmapKind kind, const std::vector<uint64_t>& now,
                                   const std::vector<uint64_t>& saved, std::vector<MetaStore::PageWrite>& out) {
  for (size_t first = 0; first < now.size(); first += MetaStore::kWordsPerPage) {
    const size_t n = std::min(MetaStore::kWordsPerPage, now.size() - first);
    if (std::equal(now.begin() + static_cast<long>(first), now.begin() + static_cast<long>(first + n),
                   saved.begin() + static_cast<long>(first)))
      continue;
    out.push_back({kind, static_cast<uint32_t>(first / MetaStore::kWordsPerPage),
                   std::vector<uint64_t>(now.begin() + static_cast<long>(first),
                                         now.begin() + static_cast<long>(first + n))});
  }
}

Task<std::error_code> CacheLayer::commit_pages(const std::vector<MetaStore::PageWrite>& pages,
                                               const std::vector<uint32_t>& profile) {
  co_return co_await core::offload(blocking_, [this, &pages, &profile]() -> std::error_code {
    try {
      if (!pages.empty()) store_.commit(name_, pages, std::nullopt);
      if (!profile.empty()) store_.append_profile(name_, session_, profile_batch_, profile);
      return {};
    } catch (const std::exception& e) {
      core::logger("cache")->error("{}", e.what());
      return errno_code(EIO);
    }
  });
}

Task<std::error_code> CacheLayer::run_checkpoint(bool sync_data) {
  const uint64_t started = checkpoint_requested_.load(std::memory_order_acquire);
  // Snapshots first: everything in them happened before the data sync below.
  std::vector<uint64_t> touched(touched_.word_count());
  if (sync_data)
    for (size_t i = 0; i < touched.size(); ++i) touched[i] = touched_.exchange_word(i, 0);
  std::vector<uint64_t> present(present_.word_count()), dirty(dirty_.word_count());
  for (size_t i = 0; i < present.size(); ++i) {
    present[i] = present_.word(i);
    dirty[i] = dirty_.word(i) | cleaning_.word(i);
  }
  if (sync_data) {
    if (auto ec = co_await cache_file_->flush()) {
      for (size_t i = 0; i < touched.size(); ++i)
        if (touched[i]) touched_.store_word(i, touched_.word(i) | touched[i]);
      log_->error("export '{}': syncing the cache file failed: {}", name_, ec.message());
      co_return ec;
    }
    // Regions written since the last checkpoint, or being written now, keep
    // their intent; the rest is durable and persisted below, so it may go.
    for (uint64_t r = 0; r < nregions_; ++r) {
      if (!intent_.test(r) || ((touched[r / 64] >> (r % 64)) & 1)) continue;
      intent_.clear(r);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      if (region_writes_[r].load(std::memory_order_seq_cst) > 0) intent_.set(r);
    }
  }
  std::vector<uint64_t> intent(intent_.word_count());
  for (size_t i = 0; i < intent.size(); ++i) intent[i] = intent_.word(i);

  std::vector<MetaStore::PageWrite> pages;
  add_changed_pages(BitmapKind::intent, intent, saved_intent_, pages);
  std::vector<uint32_t> profile;  // first reads since the last save
  if (sync_data) {
    add_changed_pages(BitmapKind::present, present, saved_present_, pages);
    add_changed_pages(BitmapKind::dirty, dirty, saved_dirty_, pages);
    std::lock_guard lock(profile_mutex_);
    profile.assign(profile_.begin() + static_cast<long>(profile_saved_), profile_.end());
  }
  if (sync_data) {
    // dirty_persisted_ must never miss a bit the catalogue may hold: FLUSH and
    // FUA read it to decide whether a clean chunk still needs its clean bit
    // persisted. Set the new bits before the commit, not after it: a FUA
    // write-back that finishes while this commit runs on the blocking pool
    // would otherwise see the bit clear, skip its own checkpoint, and a power
    // loss would then bring back the older cache bytes as dirty.
    for (size_t i = 0; i < dirty.size(); ++i)
      if (dirty[i] & ~dirty_persisted_.word(i)) dirty_persisted_.store_word(i, dirty_persisted_.word(i) | dirty[i]);
  }
  if (!pages.empty() || !profile.empty()) {
    if (auto ec = co_await commit_pages(pages, profile)) co_return ec;
    if (!profile.empty()) {
      profile_saved_ += profile.size();
      ++profile_batch_;
    }
  }
  saved_intent_ = intent;
  for (size_t i = 0; i < intent.size(); ++i) intent_persisted_.store_word(i, intent[i]);
  if (sync_data) {
    for (size_t i = 0; i < dirty.size(); ++i) dirty_persisted_.store_word(i, dirty[i]);
    saved_present_ = std::move(present);
    saved_dirty_ = std::move(dirty);
    checkpoint_done_sync_.store(started);
  }
  checkpoint_done_ = started;
  co_return std::error_code{};
}

// ---- background work and shutdown -------------------------------------------------

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
  const uint64_t cache_chunks = capacity_chunks_ ? capacity_chunks_ : nchunks_;
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

Task<void> CacheLayer::abandon() {
  stopping_.store(true);
  if (background_done_) co_await background_done_->wait();
  co_await prefetcher_->stop();
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  while (readaheads_.load() > 0) {
    timer.expires_after(std::chrono::milliseconds(10));
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
  }
}

Task<void> CacheLayer::close() {
  stopping_.store(true);
  if (background_done_) co_await background_done_->wait();
  co_await prefetcher_->stop();
  {
    boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
    while (readaheads_.load() > 0) {
      timer.expires_after(std::chrono::milliseconds(10));
      co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    }
  }
  // A detach or mode change in progress (control socket) finishes before the
  // cache is persisted and the remote closed under it. Taken only after the
  // prefetcher stopped: its auto-detach takes this lock too.
  auto control = co_await control_mutex_.lock();
  // No request is running any more: every region's intent can be cleared.
  for (size_t i = 0; i < touched_.word_count(); ++i) touched_.store_word(i, 0);
  auto ec = co_await checkpoint(true);
  if (!ec) {
    ec = co_await core::offload(blocking_, [this]() -> std::error_code {
      try {
        store_.set_clean(name_, true);
        return {};
      } catch (const std::exception& e) {
        core::logger("cache")->error("{}", e.what());
        return errno_code(EIO);
      }
    });
  }
  if (ec)
    log_->error("export '{}': the cache could not be closed cleanly ({}); it will be checked at the next start",
                name_, ec.message());
  const auto s = stats();
  log_->info("export '{}': cache hits {}, misses {}, fetched {} bytes, written back {} bytes, present {} bytes, "
             "dirty {} bytes",
             name_, s.hits, s.misses, s.bytes_fetched, s.bytes_written_back, s.present_bytes, s.dirty_bytes);
  if (!remote_closed_.exchange(true)) co_await next().close();
}

CacheStats CacheLayer::stats() const {
  CacheStats s;
  s.hits = hits_.load();
  s.misses = misses_.load();
  s.bytes_fetched = fetched_.load();
  s.bytes_written_back = written_back_.load();
  s.chunk_size = cfg_.chunk_size;
  s.chunks = nchunks_;
  s.present_bytes = std::min(geometry_.size, present_.count() << chunk_shift_);
  uint64_t dirty = 0;
  for (size_t i = 0; i < dirty_.word_count(); ++i) dirty += std::popcount(dirty_.word(i) | cleaning_.word(i));
  s.dirty_bytes = std::min(geometry_.size, dirty << chunk_shift_);
  s.writeback_errors = wb_errors_.load();
  s.fetch_errors = fetch_errors_.load();
  s.recovered = recovered_;
  s.evicted_bytes = evicted_.load();
  s.evictions = evictions_.load();
  s.failed_requests = failed_requests_.load();
  s.lost_write_reports = lost_write_reports_.load();
  s.replayed_chunks = replayed_chunks_.load();
  s.capacity = capacity_chunks_ << chunk_shift_;
  struct stat st {};
  if (::stat(cache_path_.c_str(), &st) == 0) s.file_bytes = static_cast<uint64_t>(st.st_blocks) * 512;
  return s;
}

// ---- prefetch support ----------------------------------------------------------------

void CacheLayer::mark_remote_written(uint64_t first, uint64_t last) noexcept {
  for (uint64_t c = first; c <= last && c < nchunks_; ++c)
    if (!no_hole_.test(c)) no_hole_.set(c);
}

uint64_t CacheLayer::chunks_bytes(uint64_t n) const noexcept { return std::min(geometry_.size, n << chunk_shift_); }

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
      ec = co_await fetch_run(mine[i], mine[j]);
      if (!ec && fetched) *fetched += len;
    }
    i = j + 1;
  }
  release(fill, mine, ec);
  co_return ec;
}

// ---- local mode: requests, detach, write mode -------------------------------------------

Task<void> CacheLayer::wait_for_switch() {
  // The caller's InFlight counted it; while a switch drains, it must not.
  while (switching_.load(std::memory_order_seq_cst)) {
    std::shared_ptr<core::SharedEvent> done;
    {
      std::lock_guard lock(switch_mutex_);
      done = switch_done_;
    }
    inflight_.fetch_sub(1, std::memory_order_seq_cst);
    if (done) co_await done->wait();
    inflight_.fetch_add(1, std::memory_order_seq_cst);
  }
}

Task<bool> CacheLayer::quiesce() {
  {
    std::lock_guard lock(switch_mutex_);
    switch_done_ = std::make_shared<core::SharedEvent>();
  }
  switching_.store(true, std::memory_order_seq_cst);
  const auto give_up = std::chrono::steady_clock::now() + kDoorDrainLimit;
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  while (inflight_.load(std::memory_order_seq_cst) > 0) {
    if (std::chrono::steady_clock::now() >= give_up) {
      // A request in flight waits on the remote: do not hold everyone else
      // behind it.
      unquiesce();
      co_return false;
    }
    timer.expires_after(std::chrono::milliseconds(1));
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
  }
  co_return true;
}

Task<void> CacheLayer::switch_backoff(int attempt) {
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  timer.expires_after(std::chrono::milliseconds(100) * std::min(attempt, 10));
  co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
}

void CacheLayer::unquiesce() {
  std::shared_ptr<core::SharedEvent> done;
  {
    std::lock_guard lock(switch_mutex_);
    done = std::move(switch_done_);
  }
  switching_.store(false, std::memory_order_seq_cst);
  if (done) done->set();
}

Task<std::error_code> CacheLayer::local_write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  auto ec = co_await cache_file_->write(buf, offset, 0);
  if (!ec && (flags & core::kFua)) ec = co_await cache_file_->flush();
  co_return ec;
}

Task<std::error_code> CacheLayer::local_zero(ByteRange range, IoFlags flags) {
  auto ec = co_await zero_cache_file(range, flags);
  if (!ec && (flags & core::kFua)) ec = co_await cache_file_->flush();
  co_return ec;
}

Task<std::error_code> CacheLayer::zero_through_by_writes(ByteRange range, IoFlags flags) {
  static const std::vector<std::byte> zeroes(1u << 20);
  for (uint64_t pos = 0; pos < range.length;) {
    const uint64_t n = std::min<uint64_t>(zeroes.size(), range.length - pos);
    std::span<const std::byte> piece(zeroes.data(), n);
    if (auto ec = co_await write_through(piece, range.offset + pos, flags & core::kFua)) co_return ec;
    pos += n;
  }
  co_return std::error_code{};
}

Task<std::error_code> CacheLayer::persist_state(std::string key, std::string value) {
  co_return co_await core::offload(blocking_, [this, &key, &value]() -> std::error_code {
    try {
      store_.set_state(name_, key, value);
      return {};
    } catch (const std::exception& e) {
      core::logger("cache")->error("{}", e.what());
      return errno_code(EIO);
    }
  });
}

namespace {

std::string human_bytes(uint64_t n) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[64];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(n));
  else
    std::snprintf(buf, sizeof buf, "%.1f %s", v, units[u]);
  return buf;
}

}  // namespace

Task<core::ControlResult> CacheLayer::detach(bool force) {
  using core::ControlResult;
  auto control = co_await control_mutex_.lock();
  // close() may have had the lock first: nothing is switched under a closed layer.
  if (stopping_.load()) co_return ControlResult{errno_code(ESHUTDOWN), "export '" + name_ + "' is shutting down"};
  if (local_.load()) co_return ControlResult{{}, "export '" + name_ + "' is already detached (local mode)"};
  auto missing_message = [this](uint64_t missing) {
    return std::to_string(missing) + " chunks (" + human_bytes(chunks_bytes(missing)) +
           ") are not present yet; run prefetch first";
  };
  auto dirty_message = [this](uint64_t dirty) {
    return std::to_string(dirty) + " chunks (" + human_bytes(chunks_bytes(dirty)) + ") are not written back to " +
           remote_uri_ + " yet; detach with force waits for their write-back";
  };
  if (capacity_chunks_)
    // Eviction would keep punching chunks out of what is about to be the only
    // copy of the image.
    co_return ControlResult{errno_code(ENOSPC), "export '" + name_ + "' has a cache capacity smaller than the image; "
                                                "a detached cache must hold all of it (set capacity=0)"};
  if (const uint64_t missing = nchunks_ - present_.count())
    co_return ControlResult{errno_code(EBUSY), missing_message(missing)};
  if (const uint64_t dirty = dirty_chunks(); dirty && !force)
    co_return ControlResult{errno_code(EBUSY), dirty_message(dirty)};

  // The door is never held across remote I/O (a write-back to a slow or
  // absent remote would park every client for up to the retry timeout): the
  // write-back runs with requests flowing, then the door closes only to
  // check. If clients dirtied chunks in between, it opens again and the
  // switch is retried, a bounded number of times.
  auto busy = [this](const std::string& why) {
    return ControlResult{errno_code(EAGAIN), "export '" + name_ + "' is busy: " + why + " (" +
                                                 std::to_string(kSwitchAttempts) + " tries); try again"};
  };
  for (int attempt = 1;; ++attempt) {
    // close() waits for this call (control_mutex_): do not keep it waiting.
    if (stopping_.load()) co_return ControlResult{errno_code(ESHUTDOWN), "export '" + name_ + "' is shutting down"};
    for (int round = 0; round < 3 && dirty_chunks() > 0; ++round)
      if (auto ec = co_await write_back_durably(0, nchunks_ - 1))
        co_return ControlResult{ec, "write-back to " + remote_uri_ + " failed: " + ec.message()};
    if (const bool drained = co_await quiesce(); !drained) {
      if (attempt >= kSwitchAttempts)
        co_return busy("requests in flight kept waiting on " + remote_uri_ + " for longer than " +
                       std::to_string(kDoorDrainLimit.count()) + " ms");
      log_->info("export '{}': detach: requests in flight wait on the remote, trying again", name_);
      co_await switch_backoff(attempt);
      continue;
    }
    if (const uint64_t missing = nchunks_ - present_.count()) {
      unquiesce();
      co_return ControlResult{errno_code(EBUSY), missing_message(missing)};
    }
    const uint64_t dirty = dirty_chunks();
    if (dirty == 0) break;  // the door stays closed
    unquiesce();
    if (!force) co_return ControlResult{errno_code(EBUSY), dirty_message(dirty)};
    if (attempt >= kSwitchAttempts)
      co_return busy("clients dirtied " + std::to_string(dirty) +
                     " chunks again during each write-back; or switch it to writethrough first, then nothing new "
                     "becomes dirty");
    log_->info("export '{}': detach: {} chunks were dirtied during the write-back, writing back again", name_, dirty);
  }
  // Door closed, every chunk present and clean. A read-ahead or prefetch fill
  // still counted has fetched its chunks already (they are present): no
  // remote I/O is left to wait for.
  {
    boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
    while (readaheads_.load() > 0 || prefetcher_->in_flight() > 0) {
      timer.expires_after(std::chrono::milliseconds(1));
      co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    }
  }
  // Everything the catalogue says is durable in the cache file, and then the
  // catalogue says "detached": from here on the file is the image. (Local
  // disk and SQLite only, no remote.)
  if (auto ec = co_await checkpoint(true)) {
    unquiesce();
    co_return ControlResult{ec, "syncing the cache failed: " + ec.message()};
  }
  std::string key = "detached", value = "1";
  if (auto ec = co_await persist_state(std::move(key), std::move(value))) {
    unquiesce();
    co_return ControlResult{ec, "the catalogue could not record the detach: " + ec.message()};
  }
  local_.store(true, std::memory_order_seq_cst);
  {
    // A background write-back pass that began before (with nothing dirty it
    // touches nothing) ends before the remote is closed.
    auto wb = co_await writeback_mutex_.lock();
  }
  unquiesce();
  prefetcher_->mark_done();
  log_->info("export '{}': detached from {}: local mode, the cache file {} is the image", name_, remote_uri_,
             cache_path_);
  if (!remote_closed_.exchange(true)) co_await next().close();
  co_return ControlResult{{}, "detached: " + cache_path_ + " is now the image; " + remote_uri_ + " is closed"};
}

Task<core::ControlResult> CacheLayer::set_mode(std::string_view mode_name) {
  using core::ControlResult;
  WriteMode want;
  if (mode_name == "writethrough")
    want = WriteMode::writethrough;
  else if (mode_name == "writeback")
    want = WriteMode::writeback;
  else if (mode_name == "writeback-local")
    want = WriteMode::writeback_local;
  else
    co_return ControlResult{errno_code(EINVAL), "unknown write mode '" + std::string(mode_name) +
                                                    "': use writethrough, writeback or writeback-local"};
  auto control = co_await control_mutex_.lock();
  if (stopping_.load()) co_return ControlResult{errno_code(ESHUTDOWN), "export '" + name_ + "' is shutting down"};
  if (local_.load())
    co_return ControlResult{errno_code(EPERM),
                            "export '" + name_ + "' is detached (local mode): it has no remote and no write mode"};
  const WriteMode old = mode();
  if (old == want) co_return ControlResult{{}, "write mode is already " + to_string(want)};
  // To writethrough: a first write-back in the old mode, so that a remote
  // that is away fails the switch before any client write depends on it
  // (writeback-local keeps accepting writes while the remote is away).
  if (want == WriteMode::writethrough && dirty_chunks() > 0)
    if (auto ec = co_await write_back_durably(0, nchunks_ - 1))
      co_return ControlResult{ec, "write-back to " + remote_uri_ + " failed: " + ec.message() +
                                      "; the write mode stays " + to_string(old)};
  // The door only lets the requests of the old mode drain; no remote I/O
  // happens behind it, and it gives up on requests that wait on the remote.
  for (int attempt = 1;; ++attempt) {
    if (const bool drained = co_await quiesce(); drained) break;
    if (attempt >= kSwitchAttempts || stopping_.load())
      co_return ControlResult{errno_code(EAGAIN),
                              "export '" + name_ + "' is busy: requests in flight kept waiting on " + remote_uri_ +
                                  " for longer than " + std::to_string(kDoorDrainLimit.count()) + " ms (" +
                                  std::to_string(kSwitchAttempts) + " tries); the write mode stays " +
                                  to_string(old) + ", try again"};
    co_await switch_backoff(attempt);
  }
  mode_.store(want, std::memory_order_release);
  unquiesce();
  if (want == WriteMode::writethrough) {
    // Writethrough keeps no dirty data: write back what the old mode left
    // (dirtied during the first pass), with requests flowing. New writes go to the remote and dirty nothing
    // (write-back and writethrough writes exclude each other by the chunk
    // claim), so this ends; only a failed write-back dirties chunks again.
    std::error_code ec;
    for (int round = 0; round < kSwitchAttempts && !ec && dirty_chunks() > 0 && !stopping_.load(); ++round)
      ec = co_await write_back_durably(0, nchunks_ - 1);
    if (ec || dirty_chunks() > 0) {
      // Back to the old mode: the switch did not happen. No door: a
      // writethrough write still in flight (perhaps waiting for the same
      // absent remote) ends as it would have anyway.
      mode_.store(old, std::memory_order_release);
      if (!ec)
        co_return ControlResult{errno_code(EAGAIN), "export '" + name_ + "' is busy: chunks are still being written "
                                                    "back to " + remote_uri_ + "; the write mode stays " +
                                                    to_string(old) + ", try again"};
      co_return ControlResult{ec, "write-back to " + remote_uri_ + " failed: " + ec.message() +
                                      "; the write mode stays " + to_string(old)};
    }
  }
  std::string value = to_string(want);
  auto ec = co_await core::offload(blocking_, [this, &value]() -> std::error_code {
    try {
      store_.set_mode(name_, value);
      return {};
    } catch (const std::exception& e) {
      core::logger("cache")->error("{}", e.what());
      return errno_code(EIO);
    }
  });
  log_->info("export '{}': write mode {} (was {})", name_, to_string(want), to_string(old));
  co_return ControlResult{{}, "write mode is now " + to_string(want) + " (was " + to_string(old) + ")" +
                                  (ec ? "; the catalogue could not record it" : "")};
}

core::CacheReport CacheLayer::report() const {
  const auto s = stats();
  core::CacheReport r;
  r.detached = local_.load();
  r.mode = r.detached ? "local" : to_string(mode());
  r.cache_path = cache_path_;
  r.chunk_size = s.chunk_size;
  r.capacity = s.capacity;
  r.present_bytes = s.present_bytes;
  r.dirty_bytes = s.dirty_bytes;
  r.hits = s.hits;
  r.misses = s.misses;
  r.bytes_fetched = s.bytes_fetched;
  r.bytes_written_back = s.bytes_written_back;
  r.fetch_errors = s.fetch_errors;
  r.writeback_errors = s.writeback_errors;
  r.evicted_bytes = s.evicted_bytes;
  r.evictions = s.evictions;
  r.file_bytes = s.file_bytes;
  r.failed_requests = s.failed_requests;
  r.lost_write_reports = s.lost_write_reports;
  r.replayed_chunks = s.replayed_chunks;
  r.recovered = s.recovered;
  r.prefetch = prefetcher_->status();
  return r;
}

core::ControlResult CacheLayer::prefetch_start(core::PrefetchOrder order) { return prefetcher_->start(order); }
core::ControlResult CacheLayer::prefetch_pause() { return prefetcher_->pause(); }
core::ControlResult CacheLayer::prefetch_resume() { return prefetcher_->resume(); }
core::ControlResult CacheLayer::prefetch_set_rate(uint64_t bytes_per_second) {
  return prefetcher_->set_rate(bytes_per_second);
}

// ---- the stand-in remote of a detached export ------------------------------------------------

namespace {

class DetachedRemote final : public core::BlockDevice {
 public:
  DetachedRemote(uint64_t size, std::string uri) : size_(size), uri_(std::move(uri)) {}
  [[nodiscard]] core::Geometry geometry() const noexcept override { return {size_, 1, 4096, 32u << 20}; }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override { return {}; }
  [[nodiscard]] std::string describe() const override { return uri_ + " (detached, not opened)"; }
  Task<std::error_code> read(std::span<std::byte>, uint64_t, IoFlags) override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> write(std::span<const std::byte>, uint64_t, IoFlags) override {
    co_return errno_code(ENOTCONN);
  }
  Task<std::error_code> flush() override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> trim(ByteRange, IoFlags) override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> zero(ByteRange, IoFlags) override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> block_status(ByteRange, core::ExtentList&) override { co_return errno_code(ENOTCONN); }
  Task<std::error_code> prefetch(ByteRange) override { co_return errno_code(ENOTCONN); }

 private:
  uint64_t size_;
  std::string uri_;
};

}  // namespace

std::unique_ptr<core::BlockDevice> open_if_detached(MetaStore& store, const std::string& export_name,
                                                       const std::string& remote_uri) {
  auto rec = store.find(export_name);
  if (!rec || store.get_state(export_name, "detached").value_or("") != "1") return nullptr;
  if (rec->remote != remote_uri)
    throw std::runtime_error("export '" + export_name + "' is detached (local mode) from " + rec->remote +
                             " and its image is " + rec->cache_path + "; it is now configured with " + remote_uri +
                             ": restore the old URI, or serve the image itself with file://" + rec->cache_path);
  std::error_code ec;
  const auto size = std::filesystem::file_size(rec->cache_path, ec);
  if (ec || size != rec->size)
    throw std::runtime_error("export '" + export_name + "' is detached (local mode), but its image " +
                             rec->cache_path + " is missing or not " + std::to_string(rec->size) +
                             " bytes; restore it (the remote " + remote_uri + " may be out of date)");
  return std::make_unique<DetachedRemote>(rec->size, remote_uri);
}

}  // namespace blockway::cache
