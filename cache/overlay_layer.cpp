#include "cache/overlay_layer.hpp"

#include "cache/catalogue_call.hpp"
#include "cache/image_file.hpp"
#include "remote/file/file_device.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace blockway::cache {

using core::ByteRange;
using core::errno_code;
using core::IoFlags;
using core::Support;
using core::Task;

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
  std::vector<uint64_t> blocks_;
};

OverlayLayer::OverlayLayer(std::shared_ptr<core::CheckedDevice> base, Params p)
    : base_(std::move(base)),
      name_(p.export_name),
      base_name_(p.base_name),
      uri_("clone:" + p.base_name),
      cfg_(p.config),
      store_(*p.store),
      blocking_(*p.blocking),
      log_(core::logger("overlay")),
      geometry_(base_->geometry()),
      granularity_(cfg_.granularity),
      nblocks_((geometry_.size + granularity_ - 1) / granularity_) {
  if (granularity_ % geometry_.min_block != 0)
    throw std::runtime_error("overlay granularity " + std::to_string(granularity_) +
                             " is not a multiple of the base's block size " + std::to_string(geometry_.min_block));
  allocated_.resize(nblocks_);
  pending_.resize(nblocks_);
  path_ = cfg_.dir + "/" + image_file_name(name_);
  const bool injected = static_cast<bool>(p.open_overlay_file);
  std::error_code fs_ec;
  std::filesystem::create_directories(cfg_.dir, fs_ec);
  if (fs_ec) throw std::runtime_error("cannot create overlay directory " + cfg_.dir + ": " + fs_ec.message());

  const CacheRecord want{name_, uri_, path_, "overlay", geometry_.size, granularity_, true};
  const auto have = store_.find(name_);
  const bool reuse = have && have->mode == want.mode && have->remote == want.remote && have->size == want.size &&
                     have->chunk_size == want.chunk_size && have->cache_path == want.cache_path &&
                     (injected || (std::filesystem::exists(path_) && std::filesystem::file_size(path_) == want.size));
  if (have && !reuse && have->mode == "overlay") {
    // Never throw away a clone's writes because a setting changed.
    const auto saved = store_.load_bitmap(name_, BitmapKind::present, (have->size / have->chunk_size + 64) / 64 + 1);
    if (std::any_of(saved.begin(), saved.end(), [](uint64_t w) { return w != 0; }))
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
  try {
    file_ = injected ? p.open_overlay_file(path_) : std::make_unique<remote::file::FileDevice>(path_, false, blocking_);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("overlay file: ") + e.what());
  }
  if (file_->geometry().size < geometry_.size) throw std::runtime_error("overlay file " + path_ + " is too small");
  if (file_->capabilities().read_only) throw std::runtime_error("overlay file " + path_ + " is not writable");
  durable_ = store_.load_bitmap(name_, BitmapKind::present, allocated_.word_count());
  durable_.resize(allocated_.word_count());
  for (size_t i = 0; i < durable_.size(); ++i) allocated_.store_word(i, durable_[i]);
  recovered_ = reuse && !have->clean;
  store_.set_clean(name_, false);
  if (recovered_)
    log_->warn("export '{}': the overlay was not closed cleanly; {} blocks are allocated (what was flushed)", name_,
               allocated_.count());
  // Last, once nothing can throw: the destructor drops it.
  base_->add_read_only_hold("export '" + base_name_ + "' is the base of clone '" + name_ +
                            "' and is read-only while clones exist");
}

OverlayLayer::~OverlayLayer() { base_->drop_read_only_hold(); }

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
  const uint64_t end = offset + buf.size();
  for (uint64_t pos = offset; pos < end;) {
    const uint64_t b = block_of(pos);
    // The run of blocks in the same state (bits are only ever set, so a
    // block seen allocated stays so).
    const bool mine = allocated_.test(b);
    const uint64_t next = mine ? allocated_.find_clear(b) : allocated_.find_set(b);
    const uint64_t stop = std::min(end, next * granularity_);
    auto piece = buf.subspan(pos - offset, stop - pos);
    std::error_code ec;
    if (mine) {
      overlay_reads_.fetch_add(1, std::memory_order_relaxed);
      overlay_read_bytes_.fetch_add(piece.size(), std::memory_order_relaxed);
      ec = co_await file_->read(piece, pos, 0);
    } else {
      base_reads_.fetch_add(1, std::memory_order_relaxed);
      base_read_bytes_.fetch_add(piece.size(), std::memory_order_relaxed);
      ec = co_await base_->read(piece, pos, flags);
    }
    if (ec) co_return ec;
    pos = stop;
  }
  co_return std::error_code{};
}

Task<OverlayLayer::Claims> OverlayLayer::claim(uint64_t first, uint64_t last) {
  Claims claims(*this);
  for (uint64_t b = first; b <= last; ++b) {
    while (!allocated_.test(b)) {
      std::shared_ptr<core::SharedEvent> other;
      {
        std::lock_guard lock(claim_mutex_);
        auto [it, inserted] = claims_.try_emplace(b);
        if (inserted) {
          it->second = std::make_shared<core::SharedEvent>();
          claims.add(b);
          break;
        }
        other = it->second;
      }
      (void)co_await other->wait();
    }
  }
  co_return claims;
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
  event->set();
}

void OverlayLayer::mark_allocated(uint64_t first, uint64_t last) noexcept {
  for (uint64_t b = first; b <= last; ++b) {
    if (allocated_.test(b)) continue;
    // Pending first: whoever sees the block allocated (and writes to it
    // directly) can rely on the next commit persisting it.
    pending_.set(b);
    allocated_.set(b);
  }
}

Task<std::error_code> OverlayLayer::write_in_block(uint64_t b, std::span<const std::byte> data, uint64_t offset) {
  const ByteRange br = block_range(b);
  if (allocated_.test(b) || (offset == br.offset && data.size() == br.length))
    co_return co_await file_->write(data, offset, 0);
  // Copy-up: the rest of the block from the base, then the whole block.
  std::vector<std::byte> block(br.length);
  if (auto ec = co_await base_->read(block, br.offset, 0)) co_return ec;
  std::memcpy(block.data() + (offset - br.offset), data.data(), data.size());
  copy_ups_.fetch_add(1, std::memory_order_relaxed);
  co_return co_await file_->write(block, br.offset, 0);
}

Task<std::error_code> OverlayLayer::change(std::span<const std::byte> data, ByteRange range, bool zeroes,
                                           IoFlags flags) {
  if (range.length == 0) co_return std::error_code{};
  const uint64_t first = block_of(range.offset), last = block_of(range.end() - 1);
  const IoFlags zero_flags = flags & core::kNoHole;
  if (allocated_.all_set(first, last)) {
    // The common case once a clone has written a block: no coordination.
    // (No co_await inside ?: here: GCC 12 evaluates both arms.)
    std::error_code ec;
    if (zeroes)
      ec = co_await file_->zero(range, zero_flags);
    else
      ec = co_await file_->write(data, range.offset, 0);
    if (!ec && (flags & core::kFua)) ec = co_await commit();
    co_return ec;
  }
  auto claims = co_await claim(first, last);
  std::vector<std::byte> zero_piece;
  for (uint64_t pos = range.offset; pos < range.end();) {
    const uint64_t b = block_of(pos);
    const ByteRange br = block_range(b);
    std::error_code ec;
    if (pos == br.offset && range.end() >= br.end()) {
      // Whole blocks: straight to the overlay file, no copy-up.
      uint64_t stop = range.end() == geometry_.size ? range.end() : range.end() / granularity_ * granularity_;
      if (zeroes)
        ec = co_await file_->zero({pos, stop - pos}, zero_flags);
      else
        ec = co_await file_->write(data.subspan(pos - range.offset, stop - pos), pos, 0);
      pos = stop;
    } else {
      const uint64_t stop = std::min(range.end(), br.end());
      if (zeroes) zero_piece.assign(stop - pos, std::byte{0});
      ec = co_await write_in_block(b, zeroes ? std::span<const std::byte>(zero_piece) : data.subspan(pos - range.offset, stop - pos), pos);
      pos = stop;
    }
    if (ec) co_return ec;
  }
  mark_allocated(first, last);
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
  if (auto ec = co_await file_->flush()) {
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
  // One run of blocks in the same state per call (the caller asks again for the rest).
  const uint64_t b = block_of(range.offset);
  const bool mine = allocated_.test(b);
  const uint64_t next = mine ? allocated_.find_clear(b) : allocated_.find_set(b);
  const ByteRange run{range.offset, std::min(range.end(), next * granularity_) - range.offset};
  if (mine) co_return co_await file_->block_status(run, out);
  co_return co_await base_->block_status(run, out);
}

Task<std::error_code> OverlayLayer::prefetch(ByteRange range) { co_return co_await base_->prefetch(range); }

Task<void> OverlayLayer::close() {
  if (closed_) co_return;
  closed_ = true;
  if (auto ec = co_await commit()) {
    log_->error("export '{}': closing the overlay: {}", name_, ec.message());
    co_return;
  }
  (void)co_await catalogue_call(blocking_, [&] { store_.set_clean(name_, true); });
}

OverlayStats OverlayLayer::stats() const {
  OverlayStats s;
  s.granularity = granularity_;
  s.blocks = nblocks_;
  const uint64_t n = allocated_.count();
  s.allocated_bytes = n * granularity_;
  if (n && allocated_.test(nblocks_ - 1)) s.allocated_bytes -= nblocks_ * granularity_ - geometry_.size;
  struct ::stat st {};
  if (::stat(path_.c_str(), &st) == 0) s.file_bytes = static_cast<uint64_t>(st.st_blocks) * 512;
  s.base_reads = base_reads_.load(std::memory_order_relaxed);
  s.base_read_bytes = base_read_bytes_.load(std::memory_order_relaxed);
  s.overlay_reads = overlay_reads_.load(std::memory_order_relaxed);
  s.overlay_read_bytes = overlay_read_bytes_.load(std::memory_order_relaxed);
  s.copy_ups = copy_ups_.load(std::memory_order_relaxed);
  s.copy_up_bytes = s.copy_ups * granularity_;
  s.commits = commits_.load(std::memory_order_relaxed);
  s.recovered = recovered_;
  return s;
}

}  // namespace blockway::cache
