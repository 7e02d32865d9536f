// CacheLayer: checkpoints, the commit of the catalogue pages (bitmaps) that
// changed since the last one, with the data sync they need first.
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include "core/logging.hpp"

#include <algorithm>
#include <cerrno>
#include <optional>

namespace blockway::cache {

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
  co_return co_await catalogue_call(blocking_, [&] {
    if (!pages.empty()) store_.commit(name_, pages, std::nullopt);
    if (!profile.empty()) store_.append_profile(name_, session_, profile_batch_, profile);
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

}  // namespace blockway::cache
