// CacheLayer: construction, recovery after an unclean stop, shutdown, stats
// and the control-plane report. The rest lives beside it, one concern each:
//   cache_population.cpp   claims on chunks, fills from the remote
//   cache_requests.cpp     client requests in every write mode
//   cache_write_back.cpp   write-back; remote writes until a flush covers them
//   cache_checkpoints.cpp  catalogue checkpoints
//   cache_eviction.cpp     the background loop; eviction and punching
//   cache_modes.cpp        write-mode switch, detach, local mode
//   detached_remote.cpp    the stand-in remote of a detached export
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"
#include "cache/image_file.hpp"

#include "cache/prefetcher.hpp"

#include "core/logging.hpp"
#include "remote/file/file_device.hpp"

#include <boost/asio/as_tuple.hpp>
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

CacheLayer::CacheLayer(std::unique_ptr<core::BlockDevice> remote, Params p)
    : Layer(std::move(remote)),
      name_(p.export_name),
      remote_uri_(p.remote_uri),
      cfg_(p.config),
      store_(*p.store),
      blocking_(*p.blocking),
      background_(p.background),
      remote_bandwidth_(p.remote_bandwidth),
      log_(core::logger("cache")),
      geometry_(next().geometry()),
      remote_caps_(next().capabilities()) {
  chunk_shift_ = static_cast<unsigned>(std::countr_zero(cfg_.chunk_size));
  const uint64_t nchunks = (geometry_.size + cfg_.chunk_size - 1) >> chunk_shift_;
  const uint64_t nregions = (nchunks + kChunksPerRegion - 1) / kChunksPerRegion;
  size_.store(geometry_.size);
  nchunks_.store(nchunks);
  nregions_.store(nregions);
  mode_.store(cfg_.mode);
  // Room to grow while served (grow_while_served): address space only.
  const uint64_t reserve_chunks = std::max(nchunks, kGrowReserveBytes >> chunk_shift_);
  const uint64_t reserve_regions = (reserve_chunks + kChunksPerRegion - 1) / kChunksPerRegion;
  for (auto* b : {&present_, &dirty_, &cleaning_, &dirty_persisted_, &holes_, &no_hole_, &seen_, &unflushed_[0].chunks,
                  &unflushed_[1].chunks})
    b->resize(nchunks, reserve_chunks);
  for (auto* b : {&intent_, &intent_persisted_, &touched_}) b->resize(nregions, reserve_regions);
  region_writes_.reset(nregions, reserve_regions);
  cache_path_ = cfg_.dir + "/" + image_file_name(name_);
  if (cfg_.capacity && cfg_.capacity < geometry_.size) {
    capacity_chunks_ = cfg_.capacity >> chunk_shift_;
    referenced_.resize(nchunks, reserve_chunks);
  }

  std::error_code fs_ec;
  std::filesystem::create_directories(cfg_.dir, fs_ec);
  if (fs_ec) throw std::runtime_error("cannot create cache directory " + cfg_.dir + ": " + fs_ec.message());

  CacheRecord want{name_, remote_uri_, cache_path_, to_string(cfg_.mode), geometry_.size, cfg_.chunk_size, true};
  auto have = store_.find(name_);
  const bool injected = static_cast<bool>(p.open_cache_file);
  injected_file_ = injected;
  const bool same_cache = have && have->remote == want.remote && have->chunk_size == want.chunk_size &&
                          have->cache_path == want.cache_path;
  // The cache file's size is the record's, or (a grow that stopped between
  // extending the file and committing the record) the remote's.
  auto file_is = [&](uint64_t a, uint64_t b) {
    if (injected) return true;
    std::error_code ec;
    const auto n = std::filesystem::file_size(cache_path_, ec);
    return !ec && (n == a || n == b);
  };
  bool reuse = same_cache && have->size == want.size && file_is(want.size, want.size);
  const bool is_detached = have && store_.get_state(name_, "detached").value_or("") == "1";
  if (same_cache && !is_detached && have->size < want.size && file_is(have->size, want.size)) {
    grow_cache(*have, want.size, injected);
    reuse = true;
  }
  if (same_cache && !reuse && have->size > want.size && has_dirty(store_, *have))
    throw std::runtime_error("export '" + name_ + "': " + have->remote + " shrank from " +
                             std::to_string(have->size) + " to " + std::to_string(want.size) + " bytes, but the cache " +
                             have->cache_path + " holds data not yet written to it; grow the image back to " +
                             std::to_string(have->size) + " bytes and start the export so the data is written back "
                             "(flush), then shrink it");
  if (have && !reuse && is_detached)
    // After a detach the cache file is the only up-to-date copy of the image
    // (local-mode writes are never dirty: there is no remote to owe them to).
    throw std::runtime_error("export '" + name_ + "' is detached (local mode) and its image is " + have->cache_path +
                             " (chunk size " + std::to_string(have->chunk_size) + ", remote " + have->remote +
                             "); the export's remote, chunk size or cache directory changed: restore them, or "
                             "serve the image itself with file://" + have->cache_path);
  if (have && !reuse) {
    // Never throw away data the remote does not have.
    if (has_dirty(store_, *have))
      throw std::runtime_error("export '" + name_ + "': the cache " + have->cache_path +
                               " holds data not yet written to " + have->remote +
                               ", but the remote, size, chunk size or cache file changed; restore the previous "
                               "settings so it can be written back");
    log_->warn("export '{}': cache settings or remote changed, starting with an empty cache", name_);
  }
  if (!reuse && injected) {
    store_.reset(want);
  } else if (!reuse) {
    create_image_file(cache_path_, geometry_.size, cfg_.preallocate);
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
    std::string why;
    direct_ = DirectWriter::open(cache_path_, why);
    if (!direct_) log_->debug("export '{}': {} on {}: fills go through the page cache", name_, why, cache_path_);
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
    for (uint64_t c = 0; c < nchunks; ++c) present_.set(c);
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
             cache_path_, nchunks, cfg_.chunk_size >> 10, present_.count(), dirty_.count(),
             recovered_ ? ", recovered after an unclean stop" : "");
}

CacheLayer::~CacheLayer() = default;

void CacheLayer::abandon_waiters() {
  if (direct_) direct_->abandon();  // the kernel's writes end first; their waiters are freed
  for (auto& s : shards_) {
    std::unordered_map<uint64_t, std::shared_ptr<Fill>> fills;
    {
      std::lock_guard lock(s.mutex);
      fills.swap(s.fills);
    }
  }  // each fill (and its events, their waiters) freed here, out of the lock
  background_done_.reset();
  std::shared_ptr<core::SharedEvent> switching;
  {
    std::lock_guard lock(switch_mutex_);
    switching = std::move(switch_done_);
  }
}

bool CacheLayer::has_dirty(MetaStore& store, const CacheRecord& rec) {
  const auto dirty = store.load_bitmap(rec.name, BitmapKind::dirty, (rec.size / rec.chunk_size + 64) / 64 + 1);
  return std::any_of(dirty.begin(), dirty.end(), [](uint64_t w) { return w != 0; });
}

void CacheLayer::grow_cache(const CacheRecord& have, uint64_t new_size, bool injected) {
  // The remote grew while the export was not served (rbd resize, truncate
  // -s): every present and dirty chunk stays; the new chunks are absent.
  // Order, so that a crash anywhere leaves a cache that opens: the file is
  // extended and synced first (a file larger than its record is accepted, as
  // a grow to finish), then the record's size and the bits that change are
  // committed in one transaction.
  if (!injected) {
    if (const int e = extend_cache_file(have.size, new_size))
      throw std::runtime_error("export '" + name_ + "': the remote grew from " + std::to_string(have.size) + " to " +
                               std::to_string(new_size) + " bytes, but the cache file " + cache_path_ +
                               " cannot grow with it: " + std::strerror(e));
  }
  // The old last chunk, if the old size cut it short, now reaches into the
  // new space: clean, it is dropped (fetched again whole); dirty, it stays
  // (its write-back covers the new space with the zeroes the file has there,
  // which is what the grown remote holds).
  std::vector<MetaStore::PageWrite> pages;
  const char* last_chunk = "";
  if (have.size % have.chunk_size != 0) {
    const uint64_t c = have.size >> chunk_shift_;
    const size_t word = c / 64, page = word / MetaStore::kWordsPerPage;
    const size_t nwords = (chunk_count() + 63) / 64;
    const auto dirty = store_.load_bitmap(name_, BitmapKind::dirty, nwords);
    auto present = store_.load_bitmap(name_, BitmapKind::present, nwords);
    const uint64_t bit = uint64_t{1} << (c % 64);
    if ((present[word] & bit) && !(dirty[word] & bit)) {
      present[word] &= ~bit;
      const size_t first = page * MetaStore::kWordsPerPage;
      const size_t n = std::min(MetaStore::kWordsPerPage, nwords - first);
      pages.push_back({BitmapKind::present, static_cast<uint32_t>(page),
                       std::vector<uint64_t>(present.begin() + static_cast<long>(first),
                                             present.begin() + static_cast<long>(first + n))});
      last_chunk = "; the old last chunk, cut short by the old size, is fetched again";
    } else if (dirty[word] & bit) {
      last_chunk = "; the old last chunk, cut short by the old size, stays dirty";
    }
  }
  store_.grow(name_, new_size, pages);
  log_->info("export '{}': the remote grew from {} to {} bytes since the cache was last open; the cache {} grows "
             "with it, keeping what it holds{}",
             name_, have.size, new_size, cache_path_, last_chunk);
}

int CacheLayer::extend_cache_file(uint64_t old_size, uint64_t new_size) {
  const int fd = ::open(cache_path_.c_str(), O_RDWR | O_CLOEXEC);
  int e = fd < 0 ? errno : 0;
  if (!e && ::ftruncate(fd, static_cast<off_t>(new_size)) != 0) e = errno;
  if (!e && cfg_.preallocate)
    e = ::posix_fallocate(fd, static_cast<off_t>(old_size), static_cast<off_t>(new_size - old_size));
  if (!e && ::fsync(fd) != 0) e = errno;
  if (fd >= 0) ::close(fd);
  return e;
}

void CacheLayer::recover_after_unclean_stop() {
  // A region with persisted write-intent may hold cache data that never became
  // durable or never reached the remote: every present chunk there that is
  // not persisted dirty is dropped and will be fetched again.
  uint64_t dropped = 0;
  const uint64_t nchunks = chunk_count(), nregions = nregions_.load();
  for (uint64_t r = 0; r < nregions; ++r) {
    if (!intent_.test(r)) continue;
    const uint64_t first = r * kChunksPerRegion;
    const uint64_t last = std::min(nchunks, first + kChunksPerRegion) - 1;
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
  const uint64_t nchunks = chunk_count();
  for (uint64_t c = present_.find_clear(0); c < nchunks;) {
    const uint64_t next_present = std::min(present_.find_set(c), nchunks);
    const uint64_t off = chunk_start(c), len = chunk_start(next_present - 1) + chunk_len(next_present - 1) - off;
    if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                    static_cast<off_t>(len)) != 0) {
      log_->debug("export '{}': punching absent chunks failed: {}", name_, std::strerror(errno));
      break;
    }
    punched += len;
    c = next_present >= nchunks ? nchunks : present_.find_clear(next_present);
  }
  ::close(fd);
  log_->debug("export '{}': punched {} bytes of absent chunks out of the cache file", name_, punched);
}

uint64_t CacheLayer::chunk_len(uint64_t c) const noexcept {
  const uint64_t start = chunk_start(c);
  return std::min<uint64_t>(cfg_.chunk_size, size_.load(std::memory_order_acquire) - start);
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

// ---- shutdown and stats ----

Task<void> CacheLayer::abandon() {
  stopping_.store(true);
  if (background_done_) co_await background_done_->wait();
  co_await prefetcher_->stop();
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  while (readaheads_.load() > 0 || deferred_.load() > 0 || deferred_runners_.load() > 0) {
    timer.expires_after(std::chrono::milliseconds(10));
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
  }
}

Task<void> CacheLayer::close() {
  co_await abandon();  // stops the background work; then persist, as below
  // A detach or mode change in progress (control socket) finishes before the
  // cache is persisted and the remote closed under it. Taken only after the
  // prefetcher stopped: its auto-detach takes this lock too.
  auto control = co_await control_mutex_.lock();
  // No request is running any more: every region's intent can be cleared.
  for (size_t i = 0; i < touched_.word_count(); ++i) touched_.store_word(i, 0);
  auto ec = co_await checkpoint(true);
  if (!ec) {
    ec = co_await catalogue_call(blocking_, [&] { store_.set_clean(name_, true); });
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
  const uint64_t size = image_size();
  s.chunks = chunk_count();
  s.present_bytes = std::min(size, present_.count() << chunk_shift_);
  uint64_t dirty = 0;
  for (size_t i = 0; i < dirty_.word_count(); ++i) dirty += std::popcount(dirty_.word(i) | cleaning_.word(i));
  s.dirty_bytes = std::min(size, dirty << chunk_shift_);
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

}  // namespace blockway::cache
