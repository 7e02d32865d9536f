#include "cache/prefetcher.hpp"

#include "cache/cache_layer.hpp"
#include "core/logging.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <cerrno>

namespace blockway::cache {

using core::ControlResult;
using core::errno_code;
using core::PrefetchOrder;
using core::PrefetchState;
using core::Task;
using Clock = std::chrono::steady_clock;

namespace {

// Consecutive failed runs before the prefetch gives up (state failed); the
// remote's own retry layer has already retried each of them.
constexpr int kMaxFailures = 8;
constexpr int kMaxPasses = 3;

std::string rate_text(uint64_t bps) {
  if (bps == 0) return "unlimited";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f MiB/s", static_cast<double>(bps) / (1u << 20));
  return buf;
}

}  // namespace

Prefetcher::Prefetcher(CacheLayer& cache) : c_(cache) {
  rate_limit_.store(c_.cfg_.prefetch_rate);
  if (c_.local_.load()) state_ = PrefetchState::done;
}

Prefetcher::~Prefetcher() = default;

void Prefetcher::start_at_boot() {
  if (c_.local_.load()) {
    mark_done();
    return;
  }
  std::optional<std::string> wanted, paused;
  try {
    wanted = c_.store_.get_state(c_.name_, "prefetch");
    paused = c_.store_.get_state(c_.name_, "prefetch-paused");
  } catch (const std::exception& e) {
    c_.log_->warn("export '{}': {}", c_.name_, e.what());
  }
  std::optional<PrefetchOrder> order;
  // A prefetch that was running (or paused) when the daemon stopped goes on.
  if (wanted == "sequential") order = PrefetchOrder::sequential;
  if (wanted == "hot-first") order = PrefetchOrder::hot_first;
  const bool resumed = order.has_value();
  if (!order && c_.cfg_.prefetch_auto) order = c_.cfg_.prefetch_order;
  if (!order) return;
  auto r = start(*order, resumed && paused == "1");
  if (!r.ok()) {
    c_.log_->warn("export '{}': prefetch not started: {}", c_.name_, r.message);
    set_state(PrefetchState::failed, r.message);
  } else if (resumed) {
    c_.log_->info("export '{}': prefetch ({}) continues from the persisted bitmap{}", c_.name_,
                  core::to_string(*order), paused == "1" ? ", paused" : "");
  }
}

ControlResult Prefetcher::start(PrefetchOrder order, bool paused) {
  {
    std::lock_guard lock(mutex_);
    if (c_.local_.load()) {
      state_ = PrefetchState::done;
      return {{}, "export '" + c_.name_ + "' is detached: every chunk is local"};
    }
    if (state_ == PrefetchState::running || state_ == PrefetchState::paused)
      return {errno_code(EALREADY), "prefetch of export '" + c_.name_ + "' is already " +
                                        std::string(core::to_string(state_))};
    if (c_.capacity_chunks_)
      return {errno_code(ENOSPC), "the cache capacity of export '" + c_.name_ + "' (" +
                                      std::to_string(c_.capacity_chunks_ << c_.chunk_shift_) +
                                      " bytes) is smaller than the image (" + std::to_string(c_.image_size()) +
                                      " bytes): a prefetch would evict what it copies; set capacity=0 to prefetch"};
    if (c_.stopping_.load()) return {errno_code(ESHUTDOWN), "export '" + c_.name_ + "' is shutting down"};
    state_ = paused ? PrefetchState::paused : PrefetchState::running;
    order_ = order;
    error_.clear();
    samples_.clear();
    paused_.store(paused);
    stop_.store(false);
    persisted_ = std::string(core::to_string(order));
    ++loops_;
  }
  persist();
  boost::asio::co_spawn(c_.background_, run(order), [this](std::exception_ptr e) {
    if (e) set_state(PrefetchState::failed, "internal error");
    --loops_;
  });
  return {{}, "prefetch of export '" + c_.name_ + "' started (" + std::string(core::to_string(order)) + ")"};
}

ControlResult Prefetcher::pause() {
  {
    std::lock_guard lock(mutex_);
    if (state_ != PrefetchState::running)
      return {errno_code(EINVAL), "prefetch of export '" + c_.name_ + "' is not running (it is " +
                                      std::string(core::to_string(state_)) + ")"};
    state_ = PrefetchState::paused;
    paused_.store(true);
  }
  persist();
  return {{}, "prefetch of export '" + c_.name_ + "' paused"};
}

ControlResult Prefetcher::resume() {
  {
    std::lock_guard lock(mutex_);
    if (state_ != PrefetchState::paused)
      return {errno_code(EINVAL), "prefetch of export '" + c_.name_ + "' is not paused (it is " +
                                      std::string(core::to_string(state_)) + ")"};
    state_ = PrefetchState::running;
    paused_.store(false);
  }
  persist();
  return {{}, "prefetch of export '" + c_.name_ + "' resumed"};
}

ControlResult Prefetcher::set_rate(uint64_t bytes_per_second) {
  rate_limit_.store(bytes_per_second);
  return {{}, "prefetch rate of export '" + c_.name_ + "': " + rate_text(bytes_per_second)};
}

void Prefetcher::mark_done() {
  std::lock_guard lock(mutex_);
  state_ = PrefetchState::done;
  error_.clear();
}

void Prefetcher::set_state(PrefetchState s, std::string error) {
  std::lock_guard lock(mutex_);
  state_ = s;
  error_ = std::move(error);
}

void Prefetcher::note_auto_detach(std::string why) {
  std::lock_guard lock(mutex_);
  if (state_ == PrefetchState::done) error_ = std::move(why);  // not over a state a command set meanwhile
}

core::PrefetchStatus Prefetcher::status() const {
  core::PrefetchStatus st;
  // Holes (as far as the last scan knows) are not part of the work.
  uint64_t holes = 0, present_data = 0;
  for (size_t i = 0; i < c_.present_.word_count(); ++i) {
    const uint64_t hole = c_.holes_.word(i) & ~c_.no_hole_.word(i);
    holes += std::popcount(hole);
    present_data += std::popcount(c_.present_.word(i) & ~hole);
  }
  st.total_bytes = c_.chunks_bytes(c_.nchunks_ - holes);
  st.done_bytes = std::min(st.total_bytes, c_.chunks_bytes(present_data));
  st.rate_limit = rate_limit_.load();
  std::lock_guard lock(mutex_);
  st.state = state_;
  st.order = order_;
  st.error = error_;
  if (state_ == PrefetchState::running && samples_.size() >= 2) {
    const double dt = std::chrono::duration<double>(samples_.back().first - samples_.front().first).count();
    if (dt > 0) st.rate = static_cast<double>(samples_.back().second - samples_.front().second) / dt;
    if (st.rate > 0) st.eta_seconds = static_cast<double>(st.total_bytes - st.done_bytes) / st.rate;
  }
  if (state_ == PrefetchState::done) st.eta_seconds = 0;
  return st;
}

void Prefetcher::sample_rate() {
  const auto now = Clock::now();
  std::lock_guard lock(mutex_);
  samples_.emplace_back(now, copied_.load());
  while (samples_.size() > 2 && now - samples_.front().first > std::chrono::seconds(5)) samples_.pop_front();
}

bool Prefetcher::foreground_busy() const noexcept {
  if (c_.inflight_.load(std::memory_order_relaxed) > 0) return true;
  const int64_t now = Clock::now().time_since_epoch().count();
  const int64_t quiet = std::chrono::duration_cast<Clock::duration>(kQuietAfter).count();
  return now - c_.last_request_end_.load(std::memory_order_relaxed) < quiet;
}

void Prefetcher::persist() {
  std::string wanted;
  bool paused;
  uint64_t seq;
  {
    // The sequence number is taken with the state it stands for, so the
    // newest state also has the highest number.
    std::lock_guard lock(mutex_);
    wanted = persisted_;
    paused = paused_.load();
    seq = ++persist_seq_;
  }
  // Serialised, and a write older than one already made is skipped: the
  // catalogue ends with the newest state whatever order the pool runs them.
  persist_queue_->pending.fetch_add(1, std::memory_order_relaxed);
  boost::asio::post(c_.blocking_, [queue = persist_queue_, &store = c_.store_, name = c_.name_, wanted, paused,
                                   seq] {
    struct Done {
      PersistQueue& q;
      ~Done() { q.pending.fetch_sub(1, std::memory_order_release); }
    } done{*queue};
    std::lock_guard lock(queue->mutex);
    if (seq < queue->applied) return;
    queue->applied = seq;
    try {
      store.set_state(name, "prefetch", wanted);
      store.set_state(name, "prefetch-paused", paused ? "1" : "0");
    } catch (const std::exception& e) {
      core::logger("cache")->warn("export '{}': cannot record the prefetch state: {}", name, e.what());
    }
  });
}

Task<void> Prefetcher::stop() {
  stop_.store(true);
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  while (loops_.load() > 0 || in_flight_.load() > 0) {
    timer.expires_after(std::chrono::milliseconds(5));
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
  }
  // Let every catalogue write posted so far run before the layer goes away:
  // the pool may not have started the last one yet (a pause just before a
  // close was lost that way, and the next start found no prefetch at all).
  while (persist_queue_->pending.load(std::memory_order_acquire) > 0) {
    timer.expires_after(std::chrono::milliseconds(1));
    co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
  }
}

Task<void> Prefetcher::scan_holes() {
  if (c_.remote_caps_.extents != core::Support::native) co_return;
  const uint64_t size = c_.image_size();
  const uint64_t chunk = c_.cfg_.chunk_size;
  uint64_t pos = 0;
  for (int calls = 0; pos < size && calls < (1 << 20) && !stop_.load() && !c_.stopping_.load(); ++calls) {
    core::ExtentList extents;
    const core::ByteRange range{pos, std::min<uint64_t>(size - pos, uint64_t{1} << 30)};
    if (auto ec = co_await c_.next().block_status(range, extents)) {
      c_.log_->warn("export '{}': block status of the remote failed ({}); holes will be copied", c_.name_,
                    ec.message());
      co_return;
    }
    uint64_t at = pos;
    for (const auto& e : extents) {
      const uint64_t len = std::min<uint64_t>(e.length, range.end() - at);
      if (len == 0) break;
      if (e.flags & core::kExtentZero) {
        // Whole chunks inside [at, at + len) only; the last chunk may be short.
        uint64_t c = (at + chunk - 1) / chunk;
        const uint64_t end = at + len;
        for (; c < c_.nchunks_ && c_.chunk_start(c) + c_.chunk_len(c) <= end; ++c) c_.holes_.set(c);
      }
      at += len;
    }
    if (at == pos) break;
    pos = at;
  }
}

std::vector<uint64_t> Prefetcher::hot_order() const {
  std::vector<std::vector<uint32_t>> profiles;
  try {
    profiles = c_.store_.load_profiles(c_.name_);
  } catch (const std::exception& e) {
    c_.log_->warn("export '{}': cannot read the access profile: {}", c_.name_, e.what());
  }
  std::vector<uint64_t> order;
  std::vector<bool> listed(c_.chunk_count());
  // The newest earlier session first (this one's own reads are in profile_
  // but are served already).
  for (const auto& p : profiles)
    for (uint32_t c : p)
      if (c < c_.nchunks_ && !listed[c]) {
        listed[c] = true;
        order.push_back(c);
      }
  return order;
}

Task<void> Prefetcher::sleep_for(std::chrono::microseconds d) {
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  timer.expires_after(d);
  co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
}

Task<void> Prefetcher::run(PrefetchOrder order) {
  auto ex = co_await boost::asio::this_coro::executor;
  auto wake = std::make_shared<boost::asio::steady_timer>(ex);
  const auto started = Clock::now();
  const uint64_t copied_before = copied_.load();
  co_await scan_holes();
  std::vector<uint64_t> hot;
  if (order == PrefetchOrder::hot_first) {
    auto profiles = co_await core::offload(c_.blocking_, [this] { return hot_order(); });
    hot = std::move(profiles);
  }
  // Read again before each run and at the end of a pass: the image may grow
  // while served (CacheLayer::grow_while_served).
  uint64_t n = c_.chunk_count();
  const unsigned shift = c_.chunk_shift_;
  auto quit = [this] { return stop_.load() || c_.stopping_.load() || c_.local_.load(); };
  failures_.store(0);
  double tokens = 0;
  auto refilled = Clock::now();
  auto last_sample = Clock::now() - std::chrono::seconds(1);
  bool complete = false;
  std::string failure;

  for (int pass = 0; pass < kMaxPasses && !complete && failure.empty() && !quit(); ++pass) {
    size_t hot_i = 0;
    uint64_t cursor = 0;
    for (;;) {
      // Wait for a free slot: up to kMaxInFlight runs when the export is
      // idle, one while clients are active, none while paused.
      bool busy = false;
      while (!quit()) {
        if (Clock::now() - last_sample >= std::chrono::milliseconds(250)) {
          last_sample = Clock::now();
          sample_rate();
        }
        busy = foreground_busy();
        const int limit = paused_.load() ? 0 : (busy ? 1 : kMaxInFlight);
        if (in_flight_.load() < limit) break;
        wake->expires_after(paused_.load() ? std::chrono::milliseconds(50) : std::chrono::milliseconds(2));
        co_await wake->async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
      }
      if (quit()) break;
      if (const int f = failures_.load(); f >= kMaxFailures) {
        std::lock_guard lock(mutex_);
        failure = "reading the remote failed " + std::to_string(f) + " times in a row: " + last_error_;
        break;
      } else if (f > 0) {
        co_await sleep_for(std::chrono::milliseconds(std::min(5000, 100 << std::min(f, 6))));
      }

      // The next absent chunk in this order (of the image as it is now: it
      // may have grown while served).
      n = c_.chunk_count();
      uint64_t c = n;
      while (hot_i < hot.size() && c == n) {
        const uint64_t h = hot[hot_i++];
        if (!c_.present_.test(h)) c = h;
      }
      const bool sequential = c == n;
      if (sequential) c = cursor = c_.present_.find_clear(cursor);
      if (c >= n) break;  // pass complete

      // Merge absent neighbours (of the same kind: hole or data) into one run.
      const bool hole = c_.is_hole(c);
      const uint64_t rate = rate_limit_.load();
      // A remote that prefers larger requests (an RBD object) gets whole ones.
      uint64_t run_bytes =
          busy ? kBusyRunBytes : std::clamp<uint64_t>(c_.geometry_.preferred_block, kRunBytes, kMaxRunBytes);
      if (rate) run_bytes = std::min(run_bytes, std::max<uint64_t>(rate / 4, uint64_t{1} << shift));
      const uint64_t max_chunks = std::max<uint64_t>(1, run_bytes >> shift);
      uint64_t last = c;
      while (last + 1 < n && last + 1 - c < max_chunks && !c_.present_.test(last + 1) &&
             c_.is_hole(last + 1) == hole)
        ++last;
      if (sequential) cursor = last + 1;

      // Token bucket: holes cost nothing (no remote read).
      if (rate && !hole) {
        const double need = static_cast<double>(c_.chunks_bytes(last - c + 1));
        for (;;) {
          const auto now = Clock::now();
          const double r = static_cast<double>(rate_limit_.load());
          if (r == 0) break;
          tokens = std::min(std::max(r, need), tokens + r * std::chrono::duration<double>(now - refilled).count());
          refilled = now;
          if (tokens >= need || quit()) break;
          const double wait = std::min(0.1, (need - tokens) / r);
          co_await sleep_for(std::chrono::microseconds(static_cast<int64_t>(wait * 1e6) + 1));
        }
        tokens -= need;
        if (quit()) break;
      }

      // The daemon-wide cap, before the run claims its chunks: its fill then
      // reads with kBackground, which the cap's layer does not charge again.
      if (c_.remote_bandwidth_ && !hole) {
        co_await c_.remote_bandwidth_->acquire(c_.chunks_bytes(last - c + 1), core::RemoteBandwidth::background);
        if (quit()) break;
      }

      // Paused while it waited for tokens: hold this run until resumed.
      while (paused_.load() && !quit()) co_await sleep_for(std::chrono::milliseconds(20));
      if (quit()) break;
      in_flight_.fetch_add(1);
      boost::asio::co_spawn(ex, fill(c, last), [this, wake](std::exception_ptr e, std::error_code ec) {
        if (e) ec = errno_code(EIO);
        if (ec) {
          failures_.fetch_add(1);
          std::lock_guard lock(mutex_);
          last_error_ = ec.message();
        } else {
          failures_.store(0);
        }
        in_flight_.fetch_sub(1);
        wake->cancel();
      });
    }
    // The pass has issued everything: wait for its runs.
    while (in_flight_.load() > 0) {
      wake->expires_after(std::chrono::milliseconds(5));
      co_await wake->async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    }
    n = c_.chunk_count();
    complete = c_.present_.find_clear(0) >= n;
  }
  sample_rate();
  if (c_.local_.load()) {
    mark_done();
    co_return;
  }
  if (!complete && failure.empty() && !quit())
    failure = std::to_string(n - c_.present_.count()) + " chunks could not be made present";
  if (!failure.empty()) {
    c_.log_->warn("export '{}': prefetch failed: {}", c_.name_, failure);
    set_state(PrefetchState::failed, failure);  // stays "running" in the catalogue: retried after a restart
    co_return;
  }
  if (!complete) co_return;  // stopped: the catalogue still says it runs, so it continues after a restart
  const double secs = std::chrono::duration<double>(Clock::now() - started).count();
  const uint64_t copied = copied_.load() - copied_before;
  c_.log_->info("export '{}': prefetch done: {} bytes copied in {:.1f} s ({:.1f} MiB/s)", c_.name_, copied, secs,
                secs > 0 ? static_cast<double>(copied) / secs / (1u << 20) : 0.0);
  {
    std::lock_guard lock(mutex_);
    state_ = PrefetchState::done;
    persisted_ = "done";
  }
  persist();
  if (!c_.cfg_.auto_detach) co_return;
  // Auto-detach waits for write-back (forced); while that fails (the remote
  // is away, or clients keep it busy) it tries again with back-off until it
  // works or the layer stops. Why it waits is in the report (error, with
  // state done) and in the log.
  // A prefetch started again by command after this one finished owns the
  // state and has its own auto-detach: this loop then bows out.
  auto superseded = [this] {
    std::lock_guard lock(mutex_);
    return state_ == PrefetchState::running || state_ == PrefetchState::paused;
  };
  for (int attempt = 0; !quit() && !superseded(); ++attempt) {
    const auto r = co_await c_.detach(true);
    if (!r.ok() && superseded()) co_return;
    if (r.ok()) {
      refetches_.store(0);
      c_.log_->info("export '{}': auto-detach: {}", c_.name_, r.message);
      co_return;
    }
    if (c_.local_.load()) co_return;  // detached by command meanwhile
    const uint64_t missing = c_.chunk_count() - c_.present_.count();
    if (missing > 0) {
      // Chunks went missing after the copy (a writethrough trim or a failed
      // cache update drops them): fetch them again, then detach. A new copy
      // loop does both; it starts at once the first time, then with back-off
      // (a client that keeps trimming must not keep the remote busy).
      const int k = refetches_.fetch_add(1);
      c_.log_->info("export '{}': auto-detach: {} chunks went missing after the prefetch; fetching them again{}",
                    c_.name_, missing, k ? ", then detaching (try " + std::to_string(k + 1) + ")" : ", then detaching");
      note_auto_detach("auto-detach: " + std::to_string(missing) +
                       " chunks went missing after the prefetch; fetching them again");
      const auto wait = std::chrono::milliseconds(k == 0 ? 0 : std::min(30000, 500 << std::min(k - 1, 6)));
      for (auto slept = std::chrono::milliseconds(0); slept < wait && !quit(); slept += std::chrono::milliseconds(100))
        co_await sleep_for(std::chrono::milliseconds(100));
      if (quit() || superseded()) co_return;
      if (auto again = start(order); !again.ok()) {
        if (again.ec == errno_code(EALREADY)) co_return;  // a newer run copies
        c_.log_->warn("export '{}': auto-detach stopped: the prefetch could not start again: {}", c_.name_,
                      again.message);
        set_state(PrefetchState::failed, "auto-detach: the prefetch could not start again: " + again.message);
      }
      co_return;
    }
    if (attempt % 10 == 0) c_.log_->warn("export '{}': auto-detach refused, trying again: {}", c_.name_, r.message);
    note_auto_detach("auto-detach waits: " + r.message);
    const auto wait = std::chrono::milliseconds(std::min(30000, 1000 << std::min(attempt, 5)));
    for (auto slept = std::chrono::milliseconds(0); slept < wait && !quit(); slept += std::chrono::milliseconds(100))
      co_await sleep_for(std::chrono::milliseconds(100));
  }
}

Task<std::error_code> Prefetcher::fill(uint64_t first, uint64_t last) {
  uint64_t fetched = 0;
  auto ec = co_await c_.prefetch_fill(first, last, &fetched);
  copied_.fetch_add(fetched);
  // Let the disk take the copied run now, while the rest is still being
  // fetched: the sync before a detach then finds little left to write.
  if (!ec && fetched) c_.start_writeback(c_.chunk_start(first), c_.chunk_start(last) + c_.chunk_len(last) - c_.chunk_start(first));
  co_return ec;
}

}  // namespace blockway::cache
