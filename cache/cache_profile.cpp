// CacheLayer: the access profile as a whole (what `blockway profile` shows,
// exports and imports) and emptying the cache while keeping it
// (`blockway cache drop --keep-profile`).
//
// The profile is recorded on the read path (record_first_reads: the first
// read of each chunk per daemon run, a "session", in memory) and saved at
// checkpoints (cache_checkpoints.cpp); a clone's reads of its base reach the
// base's read() like any client's, so a base records its clones' order too.
// Here it is read back, replaced, or a new session is started.
//
// Thread model: as CacheLayer's; these calls come from the control plane's
// loop. Session changes and imports happen under checkpoint_mutex_ (which
// also guards the saving of the running session); drop() runs under
// control_mutex_ (one detach / set_mode / drop at a time) and clears present
// bits behind the door (quiesce), with no request in flight: none can be
// between its present check and its cache-file read when a chunk goes, and
// the claims it takes keep fills and eviction off those chunks until the bits
// are cleared. The bytes are punched after the catalogue forgot the bits
// (punch_absent, as eviction does). Catalogue work runs on the blocking pool.
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include "cache/prefetcher.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>

namespace blockway::cache {

using core::ControlResult;

Task<std::error_code> CacheLayer::read_unrecorded(std::span<std::byte> buf, uint64_t offset) {
  co_return co_await read(buf, offset, kUnrecorded);
}

Task<std::pair<std::error_code, CacheLayer::Profile>> CacheLayer::profile() {
  Profile p;
  p.chunk_size = chunk_size();
  p.chunks = nchunks_;
  // The running session's first reads are in memory until a checkpoint.
  if (!local_.load(std::memory_order_acquire))
    if (auto ec = co_await checkpoint(true)) co_return std::pair{ec, std::move(p)};
  std::vector<std::vector<uint32_t>> sessions;
  auto ec = co_await catalogue_call(blocking_, [&] { sessions = store_.load_profiles(name_); });
  p.sessions = std::move(sessions);
  co_return std::pair{ec, std::move(p)};
}

Task<ControlResult> CacheLayer::import_profile(std::vector<std::vector<uint32_t>> sessions) {
  if (local_.load(std::memory_order_acquire))
    co_return ControlResult{errno_code(EPERM), "export '" + name_ +
                                                   "' is detached (local mode): every chunk is local, a profile "
                                                   "has nothing left to order"};
  for (const auto& s : sessions)
    for (uint32_t c : s)
      if (c >= nchunks_) co_return ControlResult{errno_code(EINVAL), "chunk " + std::to_string(c) + " is beyond the image"};
  auto guard = co_await checkpoint_mutex_.lock();
  const int64_t current = session_;
  auto ec = co_await catalogue_call(blocking_, [&] { store_.replace_profiles(name_, current, sessions); });
  if (ec) co_return ControlResult{ec, "the catalogue could not store the profile: " + ec.message()};
  co_return ControlResult{};
}

Task<std::error_code> CacheLayer::new_profile_session(bool keep) {
  auto guard = co_await checkpoint_mutex_.lock();
  std::vector<uint32_t> tail;  // first reads the last checkpoint did not save
  {
    std::lock_guard lock(profile_mutex_);
    tail.assign(profile_.begin() + static_cast<long>(profile_saved_), profile_.end());
    profile_.clear();
    for (size_t i = 0; i < seen_.word_count(); ++i) seen_.store_word(i, 0);
  }
  profile_saved_ = 0;
  const int64_t old = session_;
  const int64_t batch = profile_batch_;
  int64_t next = old;
  auto ec = co_await catalogue_call(blocking_, [&] {
    if (keep && !tail.empty()) store_.append_profile(name_, old, batch, tail);
    // Forgetting: no session survives (the running one is old; old + 1 has none).
    if (!keep) store_.replace_profiles(name_, old + 1, {});
    next = store_.begin_session(name_);
  });
  if (ec) co_return ec;  // the reads go on into the old session
  session_ = next;
  profile_batch_ = 0;
  co_return ec;
}

Task<ControlResult> CacheLayer::drop(bool keep_profile) {
  auto control = co_await control_mutex_.lock();
  if (stopping_.load()) co_return ControlResult{errno_code(ESHUTDOWN), "export '" + name_ + "' is shutting down"};
  if (local_.load())
    co_return ControlResult{errno_code(EPERM), "export '" + name_ + "' is detached (local mode): its cache file " +
                                                   cache_path_ + " is the image, with no remote to fetch it from"};
  if (prefetcher_->status().state == core::PrefetchState::running)
    co_return ControlResult{errno_code(EBUSY), "the prefetch of export '" + name_ +
                                                   "' is running and would fetch the chunks again; pause it first "
                                                   "(blockway prefetch pause " + name_ + ")"};
  auto dirty_refusal = [this](uint64_t dirty) {
    std::string how;
    if (mode() == WriteMode::writeback)
      how = "run blockway flush " + name_ + " (a flush writes them back) and drop again";
    else if (mode() == WriteMode::writeback_local)
      how = "they are written back in the background after writeback-delay, or at once by blockway mode " + name_ +
            " writethrough; then drop again";
    else
      how = "they are being written back in the background; drop again once they are";
    return ControlResult{errno_code(EBUSY), "export '" + name_ + "': " + std::to_string(dirty) + " chunks (" +
                                                human_bytes(chunks_bytes(dirty)) + ") are not on " + remote_uri_ +
                                                " yet, and dropping them would lose them: " + how};
  };
  if (const uint64_t dirty = dirty_chunks()) co_return dirty_refusal(dirty);
  // Chunks written to the remote are kept (pinned) until a remote flush
  // covers them, in case the remote loses them: flush it first.
  if (remote_flush_owed())
    if (auto ec = co_await flush_remote())
      co_return ControlResult{ec, "flushing " + remote_uri_ + " failed: " + ec.message()};
  // The running session's first reads, saved before it ends.
  if (auto ec = co_await checkpoint(true))
    co_return ControlResult{ec, "syncing the cache failed: " + ec.message()};

  for (int attempt = 1;; ++attempt) {
    if (const bool drained = co_await quiesce(); drained) break;
    if (attempt >= kSwitchAttempts || stopping_.load())
      co_return ControlResult{errno_code(EAGAIN), "export '" + name_ + "' is busy: requests in flight kept waiting on " +
                                                      remote_uri_ + " for longer than " +
                                                      std::to_string(kDoorDrainLimit.count()) + " ms (" +
                                                      std::to_string(kSwitchAttempts) + " tries); try again"};
    co_await switch_backoff(attempt);
  }
  // Behind the door, nothing in flight: clients dirtied nothing since the
  // check above unless a write slipped in before the door closed.
  if (const uint64_t dirty = dirty_chunks()) {
    unquiesce();
    co_return dirty_refusal(dirty);
  }
  auto fill = std::make_shared<Fill>();
  std::vector<uint64_t> victims;
  uint64_t kept = 0;  // claimed by a fill or eviction, or pinned: left in place
  for (uint64_t c = present_.find_set(0); c < nchunks_; c = present_.find_set(c + 1)) {
    auto& s = shard(c);
    std::lock_guard lock(s.mutex);
    if (s.fills.contains(c) || dirty_.test(c) || cleaning_.test(c) || pinned(c)) {
      ++kept;
      continue;
    }
    s.fills.emplace(c, fill);
    present_.clear(c);
    victims.push_back(c);
  }
  // Reads from here on are the new session's first reads.
  const auto session_ec = co_await new_profile_session(keep_profile);
  release(fill, victims, {});
  unquiesce();
  uint64_t bytes = 0;
  for (uint64_t c : victims) bytes += chunk_len(c);
  // Persists the cleared bits, then punches the chunks still absent.
  const auto unpunched = co_await punch_absent(std::move(victims));
  if (!unpunched.empty())
    log_->debug("export '{}': {} dropped chunks were not punched (fetched or claimed again)", name_, unpunched.size());
  std::string message = "export '" + name_ + "': cache emptied (" + human_bytes(bytes) + " dropped";
  if (kept) message += ", " + std::to_string(kept) + " chunks in use kept";
  message += ")";
  if (session_ec)
    message += "; the access profile could not start a new session: " + session_ec.message();
  else
    message += keep_profile ? "; access profile kept" : "; access profile forgotten";
  log_->info("{}", message);
  co_return ControlResult{{}, message};
}

}  // namespace blockway::cache
