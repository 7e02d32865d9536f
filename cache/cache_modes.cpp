// CacheLayer: local mode (after detach), switching the write mode, and
// detaching from the remote.
#include "cache/cache_layer.hpp"
#include "cache/cache_layer_internal.hpp"

#include "cache/prefetcher.hpp"

#include "core/logging.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <cerrno>

namespace blockway::cache {

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
  co_return co_await catalogue_call(blocking_, [&] { store_.set_state(name_, key, value); });
}


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
    // Deferred fills from before the switch end dirty: settle them first.
    std::error_code ec = co_await settle_deferred(0, nchunks_ - 1);
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
  auto ec = co_await catalogue_call(blocking_, [&] { store_.set_mode(name_, value); });
  log_->info("export '{}': write mode {} (was {})", name_, to_string(want), to_string(old));
  co_return ControlResult{{}, "write mode is now " + to_string(want) + " (was " + to_string(old) + ")" +
                                  (ec ? "; the catalogue could not record it" : "")};
}

}  // namespace blockway::cache
