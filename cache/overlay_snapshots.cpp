// OverlayLayer's snapshots (cache/overlay_layer.hpp has the design):
// snapshot() freezes the top as the newest snapshot and starts a new, empty
// top; revert() swaps the top for an empty one; delete_snapshot() merges a
// snapshot into the level above it. Each publishes a new Chain in one
// catalogue transaction, under ops_mutex_.
//
// Thread model: as the layer; these run on any event-loop thread, one at a
// time (ops_mutex_), while reads and writes go on (writes pass the gate that
// snapshot and revert close while they swap the top).
#include "cache/catalogue_call.hpp"
#include "cache/overlay_internal.hpp"
#include "cache/overlay_layer.hpp"

#include <algorithm>
#include <filesystem>

namespace blockway::cache {

using core::ByteRange;
using core::Task;
using overlay_internal::failure;
using overlay_internal::join_names;
using overlay_internal::valid_snapshot_name;

size_t OverlayLayer::find_snapshot(const Chain& c, const std::string& name) {
  return static_cast<size_t>(std::find(c.names.begin(), c.names.end(), name) - c.names.begin());
}

std::vector<SnapshotInfo> OverlayLayer::snapshots() const {
  const auto c = chain();
  std::vector<SnapshotInfo> out;
  for (size_t i = 0; i < c->names.size(); ++i) {
    const auto& bits = c->levels[i]->allocated;
    const uint64_t n = bits.count();
    uint64_t bytes = n * granularity_;
    if (n && bits.test(nblocks_ - 1)) bytes -= nblocks_ * granularity_ - geometry_.size;
    out.push_back({c->names[i], bytes});
  }
  return out;
}

Task<core::ControlResult> OverlayLayer::snapshot(std::string snap) {
  if (!valid_snapshot_name(snap))
    co_return failure(EINVAL, "snapshot name '" + snap + "' must be 1-64 letters, digits, '.', '_' or '-' "
                              "(not starting with '.')");
  auto ops = co_await ops_mutex_.lock();
  if (flatten_state_.load() == core::FlattenState::running)
    co_return failure(EBUSY, "a flatten of clone '" + name_ + "' is running; wait for it to finish, or cancel it "
                             "(blockway flatten " + name_ + " --cancel), then take the snapshot");
  const auto old = chain();
  if (find_snapshot(*old, snap) != old->names.size())
    co_return failure(EEXIST, "clone '" + name_ + "' already has a snapshot '" + snap + "'");
  const std::string path = fresh_path();
  std::shared_ptr<Level> top;
  if (auto ec = co_await catalogue_call(blocking_, [&] { top = new_top(path); }))
    co_return failure(ec.value(), "cannot create the new overlay file " + path + " (see the log)");
  pause();
  co_await drain();
  auto guard = co_await commit_mutex_.lock();
  std::error_code ec = co_await commit_locked();
  auto next = std::make_shared<Chain>(*old);
  next->names.push_back(snap);
  if (!ec)
    ec = co_await catalogue_call(blocking_, [&] {
      store_.freeze_overlay(name_, name_ + "@" + snap, path, join_names(next->names));
    });
  if (ec) {
    resume();
    std::error_code ignored;
    std::filesystem::remove(path, ignored);
    co_return failure(ec.value(), "snapshot '" + snap + "' of clone '" + name_ + "' failed: " + ec.message());
  }
  // The old top (same object: readers may hold it) becomes the newest snapshot.
  old->levels.back()->record = name_ + "@" + snap;
  top->record = name_;
  next->levels.push_back(top);
  for (size_t i = 0; i < durable_.size(); ++i) durable_[i] = 0;
  chain_.store(std::shared_ptr<const Chain>(std::move(next)), std::memory_order_release);
  resume();
  log_->info("export '{}': snapshot '{}' taken; new writes go to {}", name_, snap, path);
  co_return core::ControlResult{{}, "snapshot '" + snap + "' of clone '" + name_ + "' taken"};
}

Task<core::ControlResult> OverlayLayer::revert(std::string snap) {
  auto ops = co_await ops_mutex_.lock();
  const auto old = chain();
  const size_t k = find_snapshot(*old, snap);
  if (k == old->names.size()) co_return failure(ENOENT, "clone '" + name_ + "' has no snapshot '" + snap + "'");
  if (k + 1 != old->names.size()) {
    std::string later;
    for (size_t l = k + 1; l < old->names.size(); ++l) later += (later.empty() ? "'" : ", '") + old->names[l] + "'";
    co_return failure(EBUSY, "revert goes back to the newest snapshot only; delete the later snapshot(s) " + later +
                                 " of clone '" + name_ + "' first");
  }
  const std::string path = fresh_path();
  std::shared_ptr<Level> top;
  if (auto ec = co_await catalogue_call(blocking_, [&] { top = new_top(path); }))
    co_return failure(ec.value(), "cannot create the new overlay file " + path + " (see the log)");
  pause();
  co_await drain();
  auto guard = co_await commit_mutex_.lock();
  // One transaction is the switch: before it the old top, after it the empty one.
  if (auto ec = co_await catalogue_call(blocking_, [&] { store_.replace_overlay(name_, path); })) {
    resume();
    std::error_code ignored;
    std::filesystem::remove(path, ignored);
    co_return failure(ec.value(), "revert of clone '" + name_ + "' failed: " + ec.message());
  }
  auto next = std::make_shared<Chain>(*old);
  const std::string dropped = next->levels.back()->path;
  next->levels.back() = top;
  for (size_t i = 0; i < durable_.size(); ++i) {
    durable_[i] = 0;
    (void)pending_.exchange_word(i, 0);
  }
  chain_.store(std::shared_ptr<const Chain>(std::move(next)), std::memory_order_release);
  resume();
  if (!injected_) {
    std::error_code ignored;
    std::filesystem::remove(dropped, ignored);
  }
  log_->info("export '{}': reverted to snapshot '{}'", name_, snap);
  co_return core::ControlResult{{}, "clone '" + name_ + "' reverted to snapshot '" + snap + "'"};
}

Task<core::ControlResult> OverlayLayer::delete_snapshot(std::string snap) {
  auto ops = co_await ops_mutex_.lock();
  const auto old = chain();
  const size_t k = find_snapshot(*old, snap);
  if (k == old->names.size()) co_return failure(ENOENT, "clone '" + name_ + "' has no snapshot '" + snap + "'");
  const Level& from = *old->levels[k];
  Level& to = *old->levels[k + 1];
  const bool into_top = k + 2 == old->levels.size();
  std::error_code ec;  // (no co_await inside ?: : GCC 12 evaluates both arms)
  if (into_top)
    ec = co_await merge_into_top(from, to);
  else
    ec = co_await merge_into_frozen(from, to);
  auto next = std::make_shared<Chain>(*old);
  next->names.erase(next->names.begin() + static_cast<ptrdiff_t>(k));
  next->levels.erase(next->levels.begin() + static_cast<ptrdiff_t>(k));
  if (!ec)
    ec = co_await catalogue_call(blocking_, [&] { store_.drop_snapshot(name_, from.record, join_names(next->names)); });
  if (ec)
    co_return failure(ec.value(), "deleting snapshot '" + snap + "' of clone '" + name_ + "' failed (it is kept): " +
                                      ec.message());
  const std::string dropped = from.path;
  chain_.store(std::shared_ptr<const Chain>(std::move(next)), std::memory_order_release);
  if (!injected_) {
    std::error_code ignored;
    std::filesystem::remove(dropped, ignored);
  }
  log_->info("export '{}': snapshot '{}' deleted (merged into the level above)", name_, snap);
  co_return core::ControlResult{{}, "snapshot '" + snap + "' of clone '" + name_ + "' deleted"};
}

// Copies the blocks of `from` that the top has not written into the top,
// each under a claim as a writer's copy-up would, then commits them.
Task<std::error_code> OverlayLayer::merge_into_top(const Level& from, Level& top) {
  std::vector<std::byte> block;
  for (uint64_t b = from.allocated.find_set(0); b < nblocks_; b = from.allocated.find_set(b + 1)) {
    bool copied = false;
    if (auto ec = co_await copy_into_top(top, b, *from.file, block, &copied)) co_return ec;
  }
  co_return co_await commit();
}

// The same into a frozen snapshot: nobody writes it, so no claims; its file
// is made durable before its bits are committed.
Task<std::error_code> OverlayLayer::merge_into_frozen(const Level& from, Level& to) {
  std::vector<std::byte> block;
  bool any = false;
  for (uint64_t b = from.allocated.find_set(0); b < nblocks_; b = from.allocated.find_set(b + 1)) {
    if (to.allocated.test(b)) continue;
    const ByteRange br = block_range(b);
    block.resize(br.length);
    if (auto ec = co_await from.file->read(block, br.offset, 0)) co_return ec;
    if (auto ec = co_await to.file->write(block, br.offset, 0)) co_return ec;
    to.allocated.set(b);
    any = true;
  }
  if (!any) co_return std::error_code{};
  if (auto ec = co_await to.file->flush()) co_return ec;
  std::vector<MetaStore::PageWrite> pages;
  for (size_t lo = 0; lo < to.allocated.word_count(); lo += MetaStore::kWordsPerPage) {
    const size_t hi = std::min(to.allocated.word_count(), lo + MetaStore::kWordsPerPage);
    std::vector<uint64_t> words;
    for (size_t i = lo; i < hi; ++i) words.push_back(to.allocated.word(i));
    pages.push_back({BitmapKind::present, static_cast<uint32_t>(lo / MetaStore::kWordsPerPage), std::move(words)});
  }
  co_return co_await catalogue_call(blocking_, [&] { store_.commit(to.record, pages, std::nullopt); });
}

}  // namespace blockway::cache
