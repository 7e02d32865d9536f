#include "cache/overlay_layer.hpp"

#include "cache/catalogue_call.hpp"
#include "cache/image_file.hpp"
#include "cache/overlay_internal.hpp"
#include "remote/file/file_device.hpp"

#include <sys/stat.h>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/container/small_vector.hpp>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <utility>

namespace blockway::cache {

using core::ByteRange;
using core::errno_code;
using core::IoFlags;
using core::Support;
using core::Task;
using overlay_internal::failure;
using overlay_internal::join_names;
using overlay_internal::valid_snapshot_name;

// The blocks one request claimed; releasing wakes whoever waits for them.
class OverlayLayer::Claims {
 public:
  explicit Claims(OverlayLayer& o) : o_(&o) {}
  Claims(Claims&& other) noexcept : o_(other.o_), blocks_(std::move(other.blocks_)) { other.blocks_.clear(); }
  Claims& operator=(Claims&&) = delete;
  Claims(const Claims&) = delete;
  ~Claims() {
    for (uint64_t b : blocks_) o_->release(b);
  }
  void add(uint64_t b) { blocks_.push_back(b); }

 private:
  OverlayLayer* o_;
  boost::container::small_vector<uint64_t, 4> blocks_;  // a write claims one or two blocks: no allocation
};

// A write inside the gate that snapshot/revert close: they wait until no
// pass is held, so the top does not change under a write.
class OverlayLayer::WriterPass {
 public:
  explicit WriterPass(OverlayLayer* o) : o_(o) {}
  WriterPass(WriterPass&& other) noexcept : o_(std::exchange(other.o_, nullptr)) {}
  WriterPass& operator=(WriterPass&&) = delete;
  ~WriterPass() {
    if (o_) o_->writers_.fetch_sub(1, std::memory_order_seq_cst);
  }

 private:
  OverlayLayer* o_;
};

namespace {

constexpr const char* kChainKey = "snapshots";

std::vector<std::string> split_names(const std::string& s) {
  std::vector<std::string> out;
  for (size_t pos = 0; pos < s.size();) {
    const size_t nl = std::min(s.find('\n', pos), s.size());
    if (nl > pos) out.push_back(s.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return out;
}

// The clone's state key that keeps its base's block sizes, "MIN PREFERRED
// MAX_TRANSFER", so that a flattened clone opened without its base keeps
// the geometry its clients saw.
constexpr const char* kGeometryKey = "geometry";

std::string geometry_text(const core::Geometry& g) {
  return std::to_string(g.min_block) + " " + std::to_string(g.preferred_block) + " " + std::to_string(g.max_transfer);
}

// The clone's geometry: its base's, or, for a flattened clone opened
// without its base, the size its catalogue record keeps and the block sizes
// its state keeps (the defaults for a clone flattened before they were kept).
core::Geometry opening_geometry(const core::CheckedDevice* base, MetaStore& store, const std::string& name) {
  if (base) return base->geometry();
  const auto rec = store.find(name);
  if (!rec || rec->mode != "overlay" || !OverlayLayer::flattened_in(store, name))
    throw std::runtime_error("clone '" + name + "' has no base and is not flattened");
  core::Geometry g;
  g.size = rec->size;
  if (const auto kept = store.get_state(name, kGeometryKey)) {
    unsigned long long min = 0, preferred = 0, max = 0;
    if (std::sscanf(kept->c_str(), "%llu %llu %llu", &min, &preferred, &max) != 3 || min == 0 ||
        preferred == 0 || min > max || max > UINT32_MAX || (min & (min - 1)) != 0)
      throw std::runtime_error("clone '" + name + "': its catalogue keeps an invalid geometry '" + *kept + "'");
    g.min_block = static_cast<uint32_t>(min);
    g.preferred_block = static_cast<uint32_t>(preferred);
    g.max_transfer = static_cast<uint32_t>(max);
  }
  return g;
}

}  // namespace

OverlayLayer::OverlayLayer(std::shared_ptr<core::CheckedDevice> base, Params p)
    : base_(std::move(base)),
      name_(p.export_name),
      base_name_(p.base_name),
      uri_("clone:" + p.base_name),
      cfg_(p.config),
      store_(*p.store),
      blocking_(*p.blocking),
      log_(core::logger("overlay")),
      geometry_(opening_geometry(base_.get(), *p.store, p.export_name)),
      granularity_(cfg_.granularity),
      nblocks_((geometry_.size + granularity_ - 1) / granularity_) {
  if (granularity_ % geometry_.min_block != 0)
    throw std::runtime_error("overlay granularity " + std::to_string(granularity_) +
                             " is not a multiple of the base's block size " + std::to_string(geometry_.min_block));
  pending_.resize(nblocks_);
  background_ = p.background;
  const bool injected = static_cast<bool>(p.open_overlay_file);
  injected_ = injected;
  open_file_ = p.open_overlay_file;
  if (!open_file_)
    open_file_ = [this](const std::string& path) -> std::unique_ptr<core::BlockDevice> {
      return std::make_unique<remote::file::FileDevice>(path, false, blocking_);
    };
  std::error_code fs_ec;
  std::filesystem::create_directories(cfg_.dir, fs_ec);
  if (fs_ec) throw std::runtime_error("cannot create overlay directory " + cfg_.dir + ": " + fs_ec.message());

  path_ = cfg_.dir + "/" + image_file_name(name_);
  const auto have = store_.find(name_);
  // The top file may have another name than the first (snapshot, revert).
  if (have && have->mode == "overlay" && std::filesystem::path(have->cache_path).parent_path() == cfg_.dir)
    path_ = have->cache_path;
  const CacheRecord want{name_, uri_, path_, "overlay", geometry_.size, granularity_, true};
  const bool reuse = have && have->mode == want.mode && have->remote == want.remote && have->size == want.size &&
                     have->chunk_size == want.chunk_size && have->cache_path == want.cache_path &&
                     (injected || (std::filesystem::exists(path_) && std::filesystem::file_size(path_) == want.size));
  if (!base_ && !reuse)
    throw std::runtime_error("clone '" + name_ + "' is flattened and its base '" + base_name_ + "' is gone, but its "
                             "overlay " + path_ + " is missing or does not match its catalogue record");
  const auto saved_chain = have && have->mode == "overlay" ? store_.get_state(name_, kChainKey) : std::nullopt;
  if (have && !reuse && have->mode == "overlay") {
    // Never throw away a clone's writes or snapshots because a setting changed.
    const auto saved = store_.load_bitmap(name_, BitmapKind::present, (have->size / have->chunk_size + 64) / 64 + 1);
    const bool holds_writes = std::any_of(saved.begin(), saved.end(), [](uint64_t w) { return w != 0; }) ||
                              (saved_chain && !saved_chain->empty());
    if (holds_writes && have->size != want.size && have->remote == want.remote &&
        have->chunk_size == want.chunk_size && have->cache_path == want.cache_path)
      throw std::runtime_error("its base '" + base_name_ + "' is now " + std::to_string(want.size) +
                               " bytes, but the clone was made at " + std::to_string(have->size) +
                               " bytes and its overlay " + have->cache_path + " holds its writes; a clone keeps "
                               "its base's size: restore the base's size, or remove the clone and make it again");
    if (holds_writes)
      throw std::runtime_error("the overlay " + have->cache_path + " holds the clone's writes (" + have->remote +
                               ", size " + std::to_string(have->size) + ", granularity " +
                               std::to_string(have->chunk_size) + "), but the base, its size, the granularity or "
                               "the overlay directory changed; restore them, or remove the clone");
  }
  if (have && !reuse) log_->warn("export '{}': starting a new, empty overlay {}", name_, path_);
  if (!reuse) {
    if (!injected) create_image_file(path_, geometry_.size, false);
    store_.reset(want);
  }
  auto c = std::make_shared<Chain>();
  if (reuse && saved_chain) c->names = split_names(*saved_chain);
  for (const auto& snap : c->names) {
    const std::string record = name_ + "@" + snap;
    const auto r = store_.find(record);
    if (!r || r->mode != "overlay-snapshot")
      throw std::runtime_error("snapshot '" + snap + "' of clone '" + name_ + "' has no catalogue record");
    c->levels.push_back(open_level(record, r->cache_path));
  }
  c->levels.push_back(open_level(name_, path_));
  const Level& top = *c->levels.back();
  durable_ = store_.load_bitmap(name_, BitmapKind::present, top.allocated.word_count());
  durable_.resize(top.allocated.word_count());
  recovered_ = reuse && !have->clean;
  store_.set_clean(name_, false);
  // The base's block sizes, for an open without it once flattened.
  if (base_ && store_.get_state(name_, kGeometryKey) != geometry_text(geometry_))
    store_.set_state(name_, kGeometryKey, geometry_text(geometry_));
  if (recovered_)
    log_->warn("export '{}': the overlay was not closed cleanly; {} blocks are allocated (what was flushed)", name_,
               top.allocated.count());
  const auto flatten = reuse ? store_.get_state(name_, kFlattenKey) : std::nullopt;
  if (flatten && *flatten == "done") {
    if (!all_allocated(*c))
      throw std::runtime_error("the catalogue says clone '" + name_ + "' is flattened, but blocks of it are in no "
                               "overlay level; restore its base '" + base_name_ + "' and flatten it again");
    standalone_ = true;
    flatten_state_ = core::FlattenState::done;
  } else if (!base_) {
    throw std::runtime_error("clone '" + name_ + "' is not flattened and its base '" + base_name_ + "' is missing");
  } else if (flatten && flatten->rfind("running", 0) == 0) {
    flatten_state_ = core::FlattenState::running;  // start() resumes it
    flatten_rate_ = flatten->size() > 8 ? std::strtoull(flatten->c_str() + 8, nullptr, 10) : 0;
  } else if (flatten && *flatten == "cancelled") {
    flatten_state_ = core::FlattenState::cancelled;
  }
  chain_.store(std::move(c), std::memory_order_release);
  if (!injected) sweep_unused_files();
  // Last, once nothing can throw: the destructor drops it. A flattened
  // clone does not need its base.
  if (!standalone_) {
    base_->add_read_only_hold("export '" + base_name_ + "' is the base of clone '" + name_ +
                              "' and is read-only while clones exist");
    hold_ = true;
  }
}

// Opens a level's file and loads its bits from the catalogue.
std::shared_ptr<OverlayLayer::Level> OverlayLayer::open_level(const std::string& record, const std::string& path) {
  auto level = std::make_shared<Level>();
  level->record = record;
  level->path = path;
  try {
    level->file = open_file_(path);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("overlay file: ") + e.what());
  }
  if (level->file->geometry().size < geometry_.size) throw std::runtime_error("overlay file " + path + " is too small");
  if (level->file->capabilities().read_only) throw std::runtime_error("overlay file " + path + " is not writable");
  level->allocated.resize(nblocks_);
  const auto words = store_.load_bitmap(record, BitmapKind::present, level->allocated.word_count());
  for (size_t i = 0; i < words.size() && i < level->allocated.word_count(); ++i)
    level->allocated.store_word(i, words[i]);
  return level;
}

// A new, empty top at `path` (its file created here unless a test opens files).
std::shared_ptr<OverlayLayer::Level> OverlayLayer::new_top(const std::string& path) {
  if (!injected_) create_image_file(path, geometry_.size, false);
  auto level = std::make_shared<Level>();
  level->record = name_;
  level->path = path;
  level->file = open_file_(path);
  level->allocated.resize(nblocks_);
  return level;
}

std::string OverlayLayer::fresh_path() const {
  for (uint64_t i = 1;; ++i) {
    std::string path = cfg_.dir + "/" + image_file_name(name_ + "." + std::to_string(i));
    const auto c = chain();
    const bool used = std::any_of(c->levels.begin(), c->levels.end(), [&](const auto& l) { return l->path == path; });
    if (!used && !std::filesystem::exists(path)) return path;
  }
}

// A new level's file (NAME.N.img) is created before the transaction that
// records it; a crash in between leaves a file no record names. Removed at
// open; a file another record names (a clone called NAME.N) is left alone.
void OverlayLayer::sweep_unused_files() {
  const std::string stem = image_file_name(name_);
  const std::string prefix = stem.substr(0, stem.size() - 4) + ".";  // "NAME."
  std::vector<std::string> used;
  try {
    used = store_.cache_paths();
  } catch (const std::runtime_error& e) {
    log_->warn("export '{}': stale overlay files not swept: {}", name_, e.what());
    return;
  }
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(cfg_.dir, ec)) {
    const std::string file = entry.path().filename().string();
    if (file.size() <= prefix.size() + 4 || file.compare(0, prefix.size(), prefix) != 0 ||
        file.compare(file.size() - 4, 4, ".img") != 0)
      continue;
    const std::string number = file.substr(prefix.size(), file.size() - prefix.size() - 4);
    if (!std::all_of(number.begin(), number.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) continue;
    const std::string path = entry.path().lexically_normal().string();
    if (std::any_of(used.begin(), used.end(),
                    [&](const std::string& u) { return std::filesystem::path(u).lexically_normal() == path; }))
      continue;
    std::error_code rm;
    if (std::filesystem::remove(path, rm))
      log_->info("export '{}': removed {}, a new level's file that a crash left unused", name_, path);
  }
}

OverlayLayer::~OverlayLayer() {
  if (hold_.exchange(false)) base_->drop_read_only_hold();
}

core::Capabilities OverlayLayer::capabilities() const noexcept {
  core::Capabilities c;
  c.flush = c.fua = c.trim = c.zero = c.extents = c.prefetch = Support::native;
  c.multi_conn = true;  // one overlay, one commit: a flush covers every connection
  return c;
}

std::string OverlayLayer::describe() const { return "clone of '" + base_name_ + "' (overlay " + path_ + ")"; }

ByteRange OverlayLayer::block_range(uint64_t b) const noexcept {
  const uint64_t start = b * granularity_;
  return {start, std::min(granularity_, geometry_.size - start)};
}

Task<std::error_code> OverlayLayer::read(std::span<std::byte> buf, uint64_t offset, IoFlags flags) {
  const auto c = chain();
  co_return co_await read_levels(*c, c->levels.size(), buf, offset, flags, true);
}

Task<std::error_code> OverlayLayer::read_levels(const Chain& c, size_t upto, std::span<std::byte> buf,
                                                uint64_t offset, IoFlags flags, bool count) {
  // The newest level of [0, upto) that holds block b, or upto: the base.
  auto owner = [&](uint64_t b) {
    for (size_t i = upto; i-- > 0;)
      if (c.levels[i]->allocated.test(b)) return i;
    return upto;
  };
  const uint64_t end = offset + buf.size();
  for (uint64_t pos = offset; pos < end;) {
    const uint64_t b = block_of(pos);
    // The run of blocks in the same level (bits of a level are only set
    // while it is in the chain, so a block seen in a level stays there).
    const size_t level = owner(b);
    uint64_t next = b + 1;
    while (next * granularity_ < end && owner(next) == level) ++next;
    const uint64_t stop = std::min(end, next * granularity_);
    auto piece = buf.subspan(pos - offset, stop - pos);
    std::error_code ec;
    if (level < upto) {
      if (count) {
        overlay_reads_.fetch_add(1, std::memory_order_relaxed);
        overlay_read_bytes_.fetch_add(piece.size(), std::memory_order_relaxed);
      }
      ec = co_await c.levels[level]->file->read(piece, pos, 0);
    } else {
      if (count) {
        base_reads_.fetch_add(1, std::memory_order_relaxed);
        base_read_bytes_.fetch_add(piece.size(), std::memory_order_relaxed);
      }
      // (A standalone clone never gets here: every block is in a level.)
      if (base_)
        ec = co_await base_->read(piece, pos, flags);
      else
        ec = errno_code(EIO);
    }
    if (ec) co_return ec;
    pos = stop;
  }
  co_return std::error_code{};
}

Task<OverlayLayer::Claims> OverlayLayer::claim(const Level& top, uint64_t first, uint64_t last) {
  Claims claims(*this);
  if (const uint64_t from = claim_now(top, first, last, claims); from <= last)
    co_await claim_rest(top, from, last, claims);
  co_return claims;
}

uint64_t OverlayLayer::claim_now(const Level& top, uint64_t first, uint64_t last, Claims& claims) {
  std::lock_guard lock(claim_mutex_);
  for (uint64_t b = first; b <= last; ++b) {
    if (top.allocated.test(b)) continue;
    if (!claims_.try_emplace(b).second) return b;  // another request holds it
    claims.add(b);
  }
  return last + 1;
}

Task<void> OverlayLayer::claim_rest(const Level& top, uint64_t from, uint64_t last, Claims& claims) {
  for (uint64_t b = from; b <= last; ++b) {
    while (!top.allocated.test(b)) {
      std::shared_ptr<core::SharedEvent> other;
      {
        std::lock_guard lock(claim_mutex_);
        auto [it, inserted] = claims_.try_emplace(b);
        if (inserted) {
          claims.add(b);
          break;
        }
        if (!it->second) it->second = std::make_shared<core::SharedEvent>();
        other = it->second;
      }
      (void)co_await other->wait();
    }
  }
}

void OverlayLayer::release(uint64_t block) noexcept {
  std::shared_ptr<core::SharedEvent> event;
  {
    std::lock_guard lock(claim_mutex_);
    auto it = claims_.find(block);
    if (it == claims_.end()) return;
    event = std::move(it->second);
    claims_.erase(it);
  }
  if (event) event->set();  // someone waits
}

void OverlayLayer::mark_allocated(Level& top, uint64_t first, uint64_t last) noexcept {
  for (uint64_t b = first; b <= last; ++b) {
    if (top.allocated.test(b)) continue;
    // Pending first: whoever sees the block allocated (and writes to it
    // directly) can rely on the next commit persisting it.
    pending_.set(b);
    top.allocated.set(b);
  }
}

Task<std::error_code> OverlayLayer::write_in_block(const Chain& c, uint64_t b, std::span<const std::byte> data,
                                                   uint64_t offset) {
  const ByteRange br = block_range(b);
  const Level& top = *c.levels.back();
  if (top.allocated.test(b) || (offset == br.offset && data.size() == br.length))
    co_return co_await top.file->write(data, offset, 0);
  // Copy-up: the rest of the block from below (snapshots, then the base),
  // then the whole block. (Not zero-filled first: the read fills it.)
  auto storage = std::make_unique_for_overwrite<std::byte[]>(br.length);
  const std::span<std::byte> block(storage.get(), br.length);
  if (auto ec = co_await read_levels(c, c.levels.size() - 1, block, br.offset, 0, false)) co_return ec;
  std::memcpy(block.data() + (offset - br.offset), data.data(), data.size());
  copy_ups_.fetch_add(1, std::memory_order_relaxed);
  co_return co_await top.file->write(block, br.offset, 0);
}

Task<std::error_code> OverlayLayer::change(std::span<const std::byte> data, ByteRange range, bool zeroes,
                                           IoFlags flags) {
  if (range.length == 0) co_return std::error_code{};
  const uint64_t first = block_of(range.offset), last = block_of(range.end() - 1);
  const IoFlags zero_flags = flags & core::kNoHole;
  auto pass = try_enter();
  if (!pass) pass.emplace(co_await enter());
  const auto c = chain();
  Level& top = *c->levels.back();
  core::BlockDevice& file = *top.file;
  if (top.allocated.all_set(first, last)) {
    // The common case once a clone has written a block: no coordination.
    // (No co_await inside ?: here: GCC 12 evaluates both arms.)
    std::error_code ec;
    if (zeroes)
      ec = co_await file.zero(range, zero_flags);
    else
      ec = co_await file.write(data, range.offset, 0);
    if (!ec && (flags & core::kFua)) ec = co_await commit();
    co_return ec;
  }
  Claims claims(*this);
  if (const uint64_t from = claim_now(top, first, last, claims); from <= last)
    co_await claim_rest(top, from, last, claims);
  std::vector<std::byte> zero_piece;
  for (uint64_t pos = range.offset; pos < range.end();) {
    const uint64_t b = block_of(pos);
    const ByteRange br = block_range(b);
    std::error_code ec;
    if (pos == br.offset && range.end() >= br.end()) {
      // Whole blocks: straight to the overlay file, no copy-up.
      uint64_t stop = range.end() == geometry_.size ? range.end() : range.end() / granularity_ * granularity_;
      if (zeroes)
        ec = co_await file.zero({pos, stop - pos}, zero_flags);
      else
        ec = co_await file.write(data.subspan(pos - range.offset, stop - pos), pos, 0);
      pos = stop;
    } else {
      const uint64_t stop = std::min(range.end(), br.end());
      if (zeroes) zero_piece.assign(stop - pos, std::byte{0});
      const auto piece = zeroes ? std::span<const std::byte>(zero_piece) : data.subspan(pos - range.offset, stop - pos);
      ec = co_await write_in_block(*c, b, piece, pos);
      pos = stop;
    }
    if (ec) co_return ec;
  }
  mark_allocated(top, first, last);
  if (flags & core::kFua) co_return co_await commit();
  co_return std::error_code{};
}

Task<std::error_code> OverlayLayer::write(std::span<const std::byte> buf, uint64_t offset, IoFlags flags) {
  co_return co_await change(buf, {offset, buf.size()}, false, flags);
}

Task<std::error_code> OverlayLayer::zero(ByteRange range, IoFlags flags) {
  if (flags & core::kFastZero) flags &= ~core::kFastZero;  // punching a hole is fast
  co_return co_await change({}, range, true, flags);
}

Task<std::error_code> OverlayLayer::trim(ByteRange range, IoFlags flags) {
  // Advisory: only whole blocks are recorded (as zeroes); the base is never touched.
  const uint64_t start = (range.offset + granularity_ - 1) / granularity_ * granularity_;
  const uint64_t end = range.end() == geometry_.size ? range.end() : range.end() / granularity_ * granularity_;
  if (end <= start) co_return std::error_code{};
  co_return co_await change({}, {start, end - start}, true, flags & core::kFua);
}

Task<std::error_code> OverlayLayer::flush() { co_return co_await commit(); }

Task<std::error_code> OverlayLayer::commit() {
  const uint64_t arrival = commits_started_.load(std::memory_order_acquire);
  auto guard = co_await commit_mutex_.lock();
  // A commit that started after this flush arrived, and succeeded, covered it.
  if (last_good_commit_.load(std::memory_order_acquire) > arrival) co_return std::error_code{};
  co_return co_await commit_locked();
}

// The commit itself, with commit_mutex_ held.
Task<std::error_code> OverlayLayer::commit_locked() {
  const auto c = chain();
  core::BlockDevice& file = *c->levels.back()->file;
  const uint64_t me = commits_started_.fetch_add(1, std::memory_order_acq_rel) + 1;
  std::vector<uint64_t> taken(pending_.word_count());
  bool any = false;
  for (size_t i = 0; i < taken.size(); ++i) {
    taken[i] = pending_.exchange_word(i, 0) & ~durable_[i];
    any = any || taken[i] != 0;
  }
  auto give_back = [&] {
    for (size_t i = 0; i < taken.size(); ++i)
      for (uint64_t w = taken[i]; w; w &= w - 1) pending_.set(i * 64 + static_cast<uint64_t>(std::countr_zero(w)));
  };
  // The data first (every block taken was written before it was taken) ...
  if (auto ec = co_await file.flush()) {
    give_back();
    co_return ec;
  }
  // ... then the bits that say it is there.
  if (any) {
    std::vector<MetaStore::PageWrite> pages;
    std::vector<uint64_t> next = durable_;
    for (size_t page = 0; page * MetaStore::kWordsPerPage < taken.size(); ++page) {
      const size_t lo = page * MetaStore::kWordsPerPage, hi = std::min(taken.size(), lo + MetaStore::kWordsPerPage);
      bool changed = false;
      for (size_t i = lo; i < hi; ++i) {
        changed = changed || taken[i] != 0;
        next[i] |= taken[i];
      }
      if (changed)
        pages.push_back({BitmapKind::present, static_cast<uint32_t>(page),
                         std::vector<uint64_t>(next.begin() + static_cast<ptrdiff_t>(lo),
                                               next.begin() + static_cast<ptrdiff_t>(hi))});
    }
    if (auto ec = co_await catalogue_call(blocking_, [&] { store_.commit(name_, pages, std::nullopt); })) {
      give_back();
      co_return ec;
    }
    durable_ = std::move(next);
  }
  commits_.fetch_add(1, std::memory_order_relaxed);
  last_good_commit_.store(me, std::memory_order_release);
  co_return std::error_code{};
}

Task<std::error_code> OverlayLayer::block_status(ByteRange range, core::ExtentList& out) {
  const auto c = chain();
  co_return co_await block_status_levels(*c, c->levels.size(), range, out);
}

Task<std::error_code> OverlayLayer::block_status_levels(const Chain& c, size_t upto, ByteRange range,
                                                        core::ExtentList& out) {
  auto owner = [&](uint64_t b) {
    for (size_t i = upto; i-- > 0;)
      if (c.levels[i]->allocated.test(b)) return i;
    return upto;
  };
  const uint64_t b = block_of(range.offset);
  const size_t level = owner(b);
  uint64_t next = b + 1;
  while (next * granularity_ < range.end() && owner(next) == level) ++next;
  const ByteRange run{range.offset, std::min(range.end(), next * granularity_) - range.offset};
  if (level < upto) co_return co_await c.levels[level]->file->block_status(run, out);
  if (!base_) co_return errno_code(EIO);
  co_return co_await base_->block_status(run, out);
}

Task<std::error_code> OverlayLayer::prefetch(ByteRange range) {
  if (standalone_.load(std::memory_order_acquire)) co_return std::error_code{};  // all local already
  co_return co_await base_->prefetch(range);
}

Task<void> OverlayLayer::close() {
  if (closed_) co_return;
  closed_ = true;
  // A running flatten stops here; the catalogue still says "running", so the
  // next start resumes it.
  co_await stop_flatten();
  if (auto ec = co_await commit()) {
    log_->error("export '{}': closing the overlay: {}", name_, ec.message());
    co_return;
  }
  (void)co_await catalogue_call(blocking_, [&] { store_.set_clean(name_, true); });
}

// --- the write gate -------------------------------------------------------

std::optional<OverlayLayer::WriterPass> OverlayLayer::try_enter() noexcept {
  // As enter(): count first, then look.
  writers_.fetch_add(1, std::memory_order_seq_cst);
  if (!paused_.load(std::memory_order_seq_cst)) return WriterPass(this);
  writers_.fetch_sub(1, std::memory_order_seq_cst);
  return std::nullopt;
}

Task<OverlayLayer::WriterPass> OverlayLayer::enter() {
  for (;;) {
    // Count first, then look (seq_cst both sides): pause() sets paused_ and
    // then waits for the count, so one of the two always sees the other.
    writers_.fetch_add(1, std::memory_order_seq_cst);
    if (!paused_.load(std::memory_order_seq_cst)) co_return WriterPass(this);
    writers_.fetch_sub(1, std::memory_order_seq_cst);
    std::shared_ptr<core::SharedEvent> wake;
    {
      std::lock_guard lock(gate_mutex_);
      wake = resume_;
    }
    if (wake) (void)co_await wake->wait();
  }
}

void OverlayLayer::pause() {
  {
    std::lock_guard lock(gate_mutex_);
    resume_ = std::make_shared<core::SharedEvent>();
  }
  paused_.store(true, std::memory_order_seq_cst);
}

Task<void> OverlayLayer::drain() {
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  while (writers_.load(std::memory_order_seq_cst) != 0) {
    timer.expires_after(std::chrono::milliseconds(1));
    co_await timer.async_wait(boost::asio::use_awaitable);
  }
}

void OverlayLayer::resume() {
  paused_.store(false, std::memory_order_seq_cst);
  std::shared_ptr<core::SharedEvent> wake;
  {
    std::lock_guard lock(gate_mutex_);
    wake = std::move(resume_);
  }
  if (wake) wake->set();
}

// Copies block b from `source` into the top unless the top holds it, under
// the claim a writer's copy-up takes (used by snapshot delete's merge and
// by flatten).
Task<std::error_code> OverlayLayer::copy_into_top(Level& top, uint64_t b, core::BlockDevice& source,
                                                  std::vector<std::byte>& block, bool* copied) {
  *copied = false;
  if (top.allocated.test(b)) co_return std::error_code{};
  auto pass = co_await enter();
  auto claims = co_await claim(top, b, b);
  if (top.allocated.test(b)) co_return std::error_code{};  // a writer took it meanwhile
  const ByteRange br = block_range(b);
  block.resize(br.length);
  if (auto ec = co_await source.read(block, br.offset, 0)) co_return ec;
  // A block of zeroes stays a hole (whatever a crash left in the file there
  // is punched away): the overlay stays sparse.
  const bool zeroes = std::all_of(block.begin(), block.end(), [](std::byte x) { return x == std::byte{0}; });
  std::error_code ec;  // (no co_await inside ?:, GCC 12)
  if (zeroes)
    ec = co_await top.file->zero(br, 0);
  else
    ec = co_await top.file->write(block, br.offset, 0);
  if (ec) co_return ec;
  mark_allocated(top, b, b);
  *copied = true;
  co_return std::error_code{};
}

OverlayStats OverlayLayer::stats() const {
  OverlayStats s;
  s.granularity = granularity_;
  s.blocks = nblocks_;
  const auto c = chain();
  auto bytes_of = [&](const Level& l) {
    const uint64_t n = l.allocated.count();
    uint64_t bytes = n * granularity_;
    if (n && l.allocated.test(nblocks_ - 1)) bytes -= nblocks_ * granularity_ - geometry_.size;
    return bytes;
  };
  s.allocated_bytes = bytes_of(*c->levels.back());
  s.snapshots = c->names.size();
  for (size_t i = 0; i + 1 < c->levels.size(); ++i) s.snapshot_bytes += bytes_of(*c->levels[i]);
  struct ::stat st {};
  if (::stat(c->levels.back()->path.c_str(), &st) == 0) s.file_bytes = static_cast<uint64_t>(st.st_blocks) * 512;
  s.base_reads = base_reads_.load(std::memory_order_relaxed);
  s.base_read_bytes = base_read_bytes_.load(std::memory_order_relaxed);
  s.overlay_reads = overlay_reads_.load(std::memory_order_relaxed);
  s.overlay_read_bytes = overlay_read_bytes_.load(std::memory_order_relaxed);
  s.copy_ups = copy_ups_.load(std::memory_order_relaxed);
  s.copy_up_bytes = s.copy_ups * granularity_;
  s.commits = commits_.load(std::memory_order_relaxed);
  s.recovered = recovered_;
  s.flatten = flatten_progress();
  return s;
}

}  // namespace blockway::cache
