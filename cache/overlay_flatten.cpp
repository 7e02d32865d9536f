// OverlayLayer's flatten: copies every block of a clone that no overlay level
// holds from its base into its top, in the background, so that the clone
// stands alone and its base can be removed.
//
// Why this way: each block goes through copy_into_top(), the same claim a
// writer's copy-up takes, so a client writing the clone meanwhile is never
// overwritten by base data (a block it wrote is simply skipped); the task
// commits (fdatasync, then the allocation bits) every kFlattenCommitBytes, so
// after a crash it resumes from the blocks still unallocated, its catalogue
// state "running RATE" telling the next start to go on. The state becomes
// "done" only after the commit that made the last block durable; then the
// base's read-only hold is dropped and the base is never read again.
//
// Thread model: the task runs on the background executor (event loop 0);
// flatten() and cancel_flatten() hold ops_mutex_ (so they never overlap a
// snapshot, revert or delete), close() stops the task and waits for it.
// Progress is read from atomics by stats on any thread.
#include "cache/catalogue_call.hpp"
#include "cache/overlay_internal.hpp"
#include "cache/overlay_layer.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <bit>
#include <chrono>

namespace blockway::cache {

using core::ControlResult;
using core::FlattenState;
using core::Task;
using overlay_internal::failure;

namespace {

std::string rate_text(uint64_t rate) {
  if (rate == 0) return "unlimited rate";
  if (rate % (1024 * 1024) == 0) return std::to_string(rate / (1024 * 1024)) + " MiB/s";
  if (rate % 1024 == 0) return std::to_string(rate / 1024) + " KiB/s";
  return std::to_string(rate) + " bytes/s";
}

}  // namespace

bool OverlayLayer::flattened_in(MetaStore& store, const std::string& name) {
  const auto state = store.get_state(name, kFlattenKey);
  return state && *state == "done";
}

bool OverlayLayer::all_allocated(const Chain& c) const {
  const size_t words = c.levels.back()->allocated.word_count();
  for (size_t i = 0; i < words; ++i) {
    uint64_t any = 0;
    for (const auto& l : c.levels) any |= l->allocated.word(i);
    // The last word's bits past nblocks_ are never set.
    const uint64_t want = (i + 1) * 64 <= nblocks_ ? ~uint64_t{0} : (uint64_t{1} << (nblocks_ % 64)) - 1;
    if ((any & want) != want) return false;
  }
  return true;
}

core::FlattenProgress OverlayLayer::flatten_progress() const {
  core::FlattenProgress p;
  p.state = flatten_state_.load(std::memory_order_acquire);
  p.total_bytes = geometry_.size;
  p.rate = flatten_rate_.load(std::memory_order_relaxed);
  p.copied_bytes = flatten_copied_.load(std::memory_order_relaxed);
  const auto c = chain();
  uint64_t blocks = 0;
  bool last = false;
  const size_t words = c->levels.back()->allocated.word_count();
  for (size_t i = 0; i < words; ++i) {
    uint64_t any = 0;
    for (const auto& l : c->levels) any |= l->allocated.word(i);
    blocks += static_cast<uint64_t>(std::popcount(any));
    if (i == (nblocks_ - 1) / 64) last = (any >> ((nblocks_ - 1) % 64)) & 1;
  }
  p.done_bytes = blocks * granularity_;
  if (last) p.done_bytes -= nblocks_ * granularity_ - geometry_.size;
  {
    std::lock_guard lock(flatten_error_mutex_);
    p.error = flatten_error_;
  }
  return p;
}

void OverlayLayer::start() {
  if (flatten_state_.load() == FlattenState::running && !flatten_done_ && !closed_) {
    log_->info("export '{}': resuming the flatten ({})", name_, rate_text(flatten_rate_.load()));
    spawn_flatten();
  }
}

void OverlayLayer::spawn_flatten() {
  if (!background_) {
    std::lock_guard lock(flatten_error_mutex_);
    flatten_error_ = "no background executor";
    flatten_state_ = FlattenState::failed;
    return;
  }
  auto done = std::make_shared<core::SharedEvent>();
  flatten_done_ = done;
  flatten_stop_ = false;
  flatten_state_ = FlattenState::running;
  boost::asio::co_spawn(*background_, run_flatten(done), [done](const std::exception_ptr&) { done->set(); });
}

Task<void> OverlayLayer::stop_flatten() {
  flatten_stop_ = true;
  if (auto done = flatten_done_) (void)co_await done->wait();
}

Task<ControlResult> OverlayLayer::flatten(uint64_t rate) {
  auto ops = co_await ops_mutex_.lock();
  if (standalone_.load())
    co_return ControlResult{{}, "clone '" + name_ + "' is already flattened: it does not need its base '" +
                                    base_name_ + "'"};
  const auto c = chain();
  if (!c->names.empty()) {
    std::string names;
    for (const auto& n : c->names) names += (names.empty() ? "'" : ", '") + n + "'";
    co_return failure(EBUSY, "clone '" + name_ + "' has snapshot(s) " + names +
                                 "; flatten fills the current overlay only, so delete them first "
                                 "(blockway snapshot delete " + name_ + " SNAPSHOT)");
  }
  if (closed_) co_return failure(ESHUTDOWN, "clone '" + name_ + "' is closing");
  const std::string state = "running " + std::to_string(rate);
  if (auto ec = co_await catalogue_call(blocking_, [&] { store_.set_state(name_, kFlattenKey, state); }))
    co_return failure(ec.value(), "cannot record the flatten of clone '" + name_ + "' in the catalogue (see the log)");
  flatten_rate_ = rate;
  if (flatten_state_.load() == FlattenState::running && flatten_done_ && !flatten_done_->is_set()) {
    log_->info("export '{}': flatten now at {}", name_, rate_text(rate));
    co_return ControlResult{{}, "flatten of clone '" + name_ + "' goes on, now at " + rate_text(rate)};
  }
  // A task that failed a moment ago may still be on its way out.
  if (auto done = flatten_done_) (void)co_await done->wait();
  {
    std::lock_guard lock(flatten_error_mutex_);
    flatten_error_.clear();
  }
  flatten_copied_ = 0;
  spawn_flatten();
  log_->info("export '{}': flatten started ({})", name_, rate_text(rate));
  co_return ControlResult{{}, "flatten of clone '" + name_ + "' started (" + rate_text(rate) +
                                  "); blockway status " + name_ + " shows its progress"};
}

Task<ControlResult> OverlayLayer::cancel_flatten() {
  auto ops = co_await ops_mutex_.lock();
  if (flatten_state_.load() != FlattenState::running)
    co_return failure(EALREADY, "no flatten of clone '" + name_ + "' is running (it is " +
                                    core::flatten_state_name(flatten_state_.load()) + ")");
  co_await stop_flatten();
  if (flatten_state_.load() == FlattenState::done)
    co_return ControlResult{{}, "flatten of clone '" + name_ + "' had already completed"};
  if (auto ec = co_await catalogue_call(blocking_, [&] { store_.set_state(name_, kFlattenKey, "cancelled"); }))
    co_return failure(ec.value(), "cannot record the cancel in the catalogue (see the log); the flatten is stopped "
                                  "but resumes at the next start");
  flatten_state_ = FlattenState::cancelled;
  const auto p = flatten_progress();
  log_->info("export '{}': flatten cancelled at {} of {} bytes", name_, p.done_bytes, p.total_bytes);
  co_return ControlResult{{}, "flatten of clone '" + name_ + "' cancelled at " + std::to_string(p.done_bytes) +
                                  " of " + std::to_string(p.total_bytes) +
                                  " bytes; what it copied stays in the overlay"};
}

void OverlayLayer::become_standalone() {
  standalone_ = true;
  if (hold_.exchange(false)) base_->drop_read_only_hold();
}

Task<void> OverlayLayer::run_flatten(std::shared_ptr<core::SharedEvent> done) {
  using clock = std::chrono::steady_clock;
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  // Snapshot create (and so revert) is refused while it runs, so the top stays
  // this level; a snapshot delete only moves blocks between levels. (Snapshots
  // exist here only if a failed flatten's clone took one before a restart.)
  const auto c = chain();
  Level& top = *c->levels.back();
  auto held_below = [&](uint64_t b) {
    for (size_t i = 0; i + 1 < c->levels.size(); ++i)
      if (c->levels[i]->allocated.test(b)) return true;
    return false;
  };
  const uint64_t commit_every = std::max<uint64_t>(1, kFlattenCommitBytes / granularity_);
  std::vector<std::byte> block;
  std::error_code ec;
  uint64_t since_commit = 0;
  // Pacing: bytes copied since `pace_start` at `pace_rate` are due at
  // pace_start + bytes / rate; the task sleeps (in slices, to notice a
  // cancel) until then.
  uint64_t pace_rate = flatten_rate_.load(), paced = 0;
  auto pace_start = clock::now();
  for (uint64_t b = 0; b < nblocks_ && !flatten_stop_.load(); ++b) {
    bool copied = false;
    if (held_below(b)) continue;  // the clone reads it from a snapshot, not the base
    ec = co_await copy_into_top(top, b, *base_, block, &copied);
    if (ec) break;
    if (!copied) continue;
    const uint64_t len = block_range(b).length;
    flatten_copied_.fetch_add(len, std::memory_order_relaxed);
    if (++since_commit >= commit_every) {
      since_commit = 0;
      ec = co_await commit();
      if (ec) break;
    }
    if (const uint64_t rate = flatten_rate_.load(); rate != pace_rate) {
      pace_rate = rate;
      pace_start = clock::now();
      paced = 0;
    }
    paced += len;
    if (pace_rate == 0) continue;
    const auto due = pace_start + std::chrono::duration_cast<clock::duration>(
                                      std::chrono::duration<double>(static_cast<double>(paced) /
                                                                    static_cast<double>(pace_rate)));
    while (!flatten_stop_.load() && clock::now() < due && flatten_rate_.load() == pace_rate) {
      timer.expires_after(std::min<clock::duration>(due - clock::now(), std::chrono::milliseconds(100)));
      boost::system::error_code wait_ec;
      co_await timer.async_wait(boost::asio::redirect_error(boost::asio::use_awaitable, wait_ec));
    }
  }
  // What was copied is made durable, whatever happens next.
  const std::error_code flushed = co_await commit();
  if (!ec) ec = flushed;
  if (ec) {
    {
      std::lock_guard lock(flatten_error_mutex_);
      flatten_error_ = ec.message();
    }
    log_->error("export '{}': flatten failed: {} (it resumes at the next start, or run blockway flatten again)",
                name_, ec.message());
    flatten_state_ = FlattenState::failed;
  } else if (!flatten_stop_.load()) {
    if (!all_allocated(*chain())) {
      std::lock_guard lock(flatten_error_mutex_);
      flatten_error_ = "blocks left unallocated";
      flatten_state_ = FlattenState::failed;
    } else if (co_await catalogue_call(blocking_, [&] { store_.set_state(name_, kFlattenKey, "done"); })) {
      std::lock_guard lock(flatten_error_mutex_);
      flatten_error_ = "cannot record the flatten as done in the catalogue";
      flatten_state_ = FlattenState::failed;
    } else {
      become_standalone();
      flatten_state_ = FlattenState::done;
      log_->info("export '{}': flatten complete ({} bytes copied from '{}'); it no longer needs its base", name_,
                 flatten_copied_.load(), base_name_);
    }
  }
  done->set();
}

}  // namespace blockway::cache
