// CacheLayer: growing while served. The remote image grew under a served
// export (rbd resize: the backend's resize handler, gateway/stack_builder.cpp)
// and new clients should see the new size, as they do on an uncached export,
// without re-adding the export.
//
// Why it is safe without pausing anything: the bitmaps and per-region
// counters never move (StableArray, cache/bitmap.hpp; reserved at open for
// kGrowReserveBytes), so requests, stats, cache_status, the background loop
// (write-back, checkpoints, eviction), readahead and the prefetcher go on
// reading them without locks while they grow; the new sizes (size_,
// nchunks_, nregions_) are published only after the storage grew and the
// catalogue committed the new size, and the export's bounds (CheckedDevice)
// move only after that, so no request reaches the new space before the
// cache can hold it. Readers that loaded the old sizes work on the old range
// (the prefetcher reads the size again at each pass). cache_layer.hpp,
// "Growing while served", lists the cases that stay refused.
//
// Crash safety: the on-disk order of grow_cache() (start-up): the cache file
// is extended and fsynced first (a file larger than its record opens, as a
// grow to finish), then the record's size is committed in one transaction.
// Nothing present or dirty is dropped. The old last chunk, when the old size
// cut it short, stays as it is: the cache file's bytes past the old end are
// the zeroes ftruncate gave it, which is what the grown image holds there
// (the gateway is the image's only writer).
//
// Thread model: a coroutine on any loop (the daemon runs it on the cache's
// background executor). It holds control_mutex_ (apart from detach,
// set_mode, drop and close) and, from growing the storage to publishing the
// sizes, checkpoint_mutex_ (the saved_* page snapshots are the checkpoints'
// and resized here; no checkpoint sees bitmaps and snapshots of different
// sizes). File and SQLite work run on the blocking pool.
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include <cstring>
#include <vector>

namespace blockway::cache {

std::string CacheLayer::grow_refusal(uint64_t new_size) const {
  if (new_size < image_size())
    return "its cache cannot shrink while served (it would drop data past the new end, dirty data too)";
  if (stopping_.load()) return "it is shutting down";
  if (local_.load()) return "it is detached (local mode): the cache file is the image and the remote is closed";
  if (cfg_.capacity && !capacity_chunks_ && cfg_.capacity < new_size)
    return "its cache capacity (" + std::to_string(cfg_.capacity) + " bytes) is smaller than the new size, and "
           "eviction cannot start under requests in flight; re-add the export (blockway export remove/add) or "
           "restart the daemon to serve the new size (the cache keeps its data, dirty data too)";
  const uint64_t nchunks = (new_size + chunk_size() - 1) >> chunk_shift_;
  if (nchunks > present_.capacity() || (nchunks + kChunksPerRegion - 1) / kChunksPerRegion > region_writes_.capacity())
    return "its cache's block maps were reserved at open for up to " +
           std::to_string(present_.capacity() << chunk_shift_) +
           " bytes; re-add the export (blockway export remove/add) or restart the daemon to serve the new size (the "
           "cache grows with it and keeps its data)";
  return {};
}

Task<std::string> CacheLayer::grow_while_served(uint64_t new_size) {
  auto control = co_await control_mutex_.lock();
  const uint64_t old_size = image_size();
  // Nothing to do: grown already (two resizes in a row, the larger first).
  // A shrink never comes here: the backend keeps its size and reports it.
  if (new_size <= old_size) co_return std::string();
  if (auto why = grow_refusal(new_size); !why.empty()) co_return why;
  const uint64_t nchunks = (new_size + chunk_size() - 1) >> chunk_shift_;
  const uint64_t nregions = (nchunks + kChunksPerRegion - 1) / kChunksPerRegion;

  if (!injected_file_) {
    auto extend = [this, old_size, new_size] { return extend_cache_file(old_size, new_size); };
    if (const int e = co_await core::offload(blocking_, extend))
      co_return "the cache file " + cache_path_ + " cannot grow with it: " + std::strerror(e);
  }

  auto checkpoints = co_await checkpoint_mutex_.lock();
  // Room in every bitmap before any of them shows more bits: readers combine
  // the same word of several (stats: dirty | cleaning).
  std::vector<AtomicBitmap*> chunk_maps{&present_, &dirty_, &cleaning_, &dirty_persisted_, &holes_, &no_hole_,
                                        &seen_, &unflushed_[0].chunks, &unflushed_[1].chunks};
  if (capacity_chunks_) chunk_maps.push_back(&referenced_);
  const std::vector<AtomicBitmap*> region_maps{&intent_, &intent_persisted_, &touched_};
  bool room = region_writes_.grow(nregions);
  for (auto* b : chunk_maps) room = room && b->make_room(nchunks);
  for (auto* b : region_maps) room = room && b->make_room(nregions);
  if (!room)  // out of memory: the room made is unused until the sizes are published
    co_return std::string("the memory for its cache's block maps cannot be had");
  for (auto* b : chunk_maps) (void)b->grow(nchunks);
  for (auto* b : region_maps) (void)b->grow(nregions);
  saved_present_.resize(present_.word_count());
  saved_dirty_.resize(dirty_.word_count());
  saved_intent_.resize(intent_.word_count());
  auto commit = [this, new_size] { store_.grow(name_, new_size, {}); };
  if (auto ec = co_await catalogue_call(blocking_, commit))
    co_return "the catalogue cannot record the new size (" + ec.message() + ")";
  size_.store(new_size, std::memory_order_seq_cst);
  nregions_.store(nregions, std::memory_order_seq_cst);
  nchunks_.store(nchunks, std::memory_order_seq_cst);
  log_->info("export '{}': the remote grew from {} to {} bytes while served; the cache {} grows with it, keeping "
             "what it holds ({} chunks now)",
             name_, old_size, new_size, cache_path_, nchunks);
  co_return std::string();
}

}  // namespace blockway::cache
