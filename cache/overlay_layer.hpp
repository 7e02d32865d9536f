// OverlayLayer: a clone's persistent copy-on-write overlay over a shared base.
//
// A clone is an export whose reads of blocks it never wrote go to its base
// export's device (the base's CheckedDevice: its cache, prefetch and one
// fetch per block serve every clone), and whose writes, trims and zeroes go
// to its overlay: a sparse local raw file of the image's size (at the same
// offsets, so it is a plain raw image of the clone's writes) plus one
// "allocated" bit per overlay block (granularity 4-64 KiB), kept in memory
// and persisted in the catalogue (MetaStore, kind present, under the clone's
// export name).
//
// Copy-up: a write that covers part of an unallocated block first reads the
// rest of that block from the base and writes the whole block. Every request
// that changes unallocated blocks claims them (ascending, one claim per
// block, waiting for other claimers), so a copy-up never overwrites a write
// another request completed meanwhile; allocated blocks need no claim, as on
// a disk. A block's bit is set only after its data is in the overlay file.
//
// Crash safety without a transaction per write: reads of unallocated blocks
// never look at the overlay file, and a copy-up always rewrites a whole
// block, so whatever an unclean stop left in the file of a block not
// persisted allocated is never seen. FLUSH (and FUA) takes the bits set
// since the last commit, fdatasyncs the overlay file, and only then commits
// them (DESIGN.md invariant 3): an allocated bit is persisted only after its
// data is durable, and every write completed before a FLUSH is durable, with
// its bit, when the FLUSH completes. Flushes are group-committed.
//
// Trim and write-zeroes record zeroes in the overlay (holes punched, blocks
// allocated) without touching the base; a trim's partial blocks are left
// alone (a trim is advisory). Block status reports the overlay file's
// extents for allocated blocks and the base's for the others.
//
// Snapshots (cache/overlay_snapshots.cpp): the overlay is a chain of levels,
// oldest first; the last, the top, takes the writes, the others are frozen snapshots (each a raw file
// plus its bits, catalogue record "CLONE@SNAPSHOT"). A block reads from the
// newest level that holds it, else from the base. snapshot() drains the
// writes in flight, commits the top, and in one catalogue transaction turns
// it into the newest snapshot and starts a new, empty top file; revert()
// swaps the top for a new, empty one in one transaction; delete_snapshot()
// merges a snapshot's blocks into the level above it (the blocks that level
// has not written: under claims when it is the top, so concurrent writers
// never race it), commits that level, then forgets the snapshot in one
// transaction. Readers load the chain once per request (an immutable
// snapshot of it), so a level they read outlives the change. A snapshot is
// also readable on its own: snapshot_view() reads the levels up to it, then
// the base (the daemon serves it as the read-only export CLONE@SNAPSHOT).
//
// While the layer lives, the base holds a read-only hold (writes to the base
// refused, with the reason, in its CheckedDevice).
//
// Flatten (cache/overlay_flatten.cpp): a background task copies every block
// that no level holds from the base into the top, each under the same claim
// as a copy-up (a block a client writes meanwhile is skipped, never
// overwritten), paced to a rate, committing every kFlattenCommitBlocks
// blocks. Its state ("running RATE", "done", "cancelled") is the clone's
// catalogue state "flatten": a restart resumes a running one from the blocks
// still unallocated. Once every block is in some level the clone is
// standalone: the base's hold is dropped, the base is never read again (no
// level operation can unallocate a block of every level), and at the next
// start the clone opens without its base (size from its record) if the base
// is gone. Snapshots are refused while it runs; it is refused while the
// clone has snapshots (it fills the top only).
//
// Thread model: every method may be called from any event-loop thread at
// once. Bitmaps are atomics; the claim map has one mutex, held only for map
// operations; commits are serialised by an AsyncMutex and run their SQLite
// work on the blocking pool. Lock order: commit_mutex_ before claim_mutex_
// (never held together in practice); ops_mutex_ (snapshot, revert, delete)
// before both. Writes pass a gate that snapshot/revert close to drain them.
#pragma once

#include "cache/bitmap.hpp"
#include "cache/meta_store.hpp"
#include "cache/overlay_config.hpp"
#include "core/async_mutex.hpp"
#include "core/block_device.hpp"
#include "core/checked_device.hpp"
#include "core/logging.hpp"
#include "core/shared_event.hpp"
#include "core/snapshot_control.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/thread_pool.hpp>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace blockway::cache {

struct OverlayStats {
  uint64_t granularity = 0, blocks = 0;
  uint64_t allocated_bytes = 0;  // blocks the clone owns: reads never reach the base
  uint64_t file_bytes = 0;       // allocated size of the overlay file (st_blocks)
  // Reads (parts of client reads) served by the base, i.e. by its shared
  // cache, and by the overlay.
  uint64_t base_reads = 0, base_read_bytes = 0;
  uint64_t overlay_reads = 0, overlay_read_bytes = 0;
  uint64_t copy_ups = 0, copy_up_bytes = 0;  // blocks filled from the base before a partial write
  uint64_t commits = 0;                      // catalogue commits (flush, FUA)
  bool recovered = false;                    // the last start followed an unclean stop
  uint64_t snapshots = 0, snapshot_bytes = 0;  // frozen levels and the bytes they hold
  core::FlattenProgress flatten;
};

using core::SnapshotInfo;

class OverlayLayer final : public core::BlockDevice, public core::SnapshotControl {
 public:
  struct Params {
    std::string export_name;  // the clone
    std::string base_name;    // its base export
    OverlayConfig config;
    MetaStore* store = nullptr;
    boost::asio::thread_pool* blocking = nullptr;
    // Opens the overlay image at a path; the default is a FileDevice on a
    // sparse file created here. Tests pass a device that simulates power loss.
    std::function<std::unique_ptr<core::BlockDevice>(const std::string& path)> open_overlay_file;
    // Where a flatten runs (required for flatten; tests may leave it unset).
    std::optional<boost::asio::any_io_executor> background;
  };

  // Opens or creates the overlay file and its map. Throws std::runtime_error
  // with a clear message (a size mismatch with the base, a changed base or
  // granularity while the overlay holds writes). `base` may be null only for
  // a clone whose catalogue says it is flattened (its base is gone).
  OverlayLayer(std::shared_ptr<core::CheckedDevice> base, Params params);
  ~OverlayLayer() override;
  OverlayLayer(const OverlayLayer&) = delete;
  OverlayLayer& operator=(const OverlayLayer&) = delete;

  [[nodiscard]] core::Geometry geometry() const noexcept override { return geometry_; }
  [[nodiscard]] core::Capabilities capabilities() const noexcept override;
  [[nodiscard]] std::string describe() const override;

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> flush() override;
  core::Task<std::error_code> trim(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> zero(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> block_status(core::ByteRange range, core::ExtentList& out) override;
  core::Task<std::error_code> prefetch(core::ByteRange range) override;
  // Commits what is durable and marks the overlay cleanly closed.
  core::Task<void> close() override;

  // Snapshots, oldest first.
  [[nodiscard]] std::vector<SnapshotInfo> snapshots() const override;
  // Freezes the clone's content as snapshot `name` (letters, digits, '.',
  // '_', '-'); new writes go to a new, empty top. Waits for writes in flight.
  core::Task<core::ControlResult> snapshot(std::string name) override;
  // Discards every write since the newest snapshot, which must be `name`
  // (EBUSY naming the later snapshots otherwise).
  core::Task<core::ControlResult> revert(std::string name) override;
  // Merges snapshot `name` into the level above it and forgets it; online.
  core::Task<core::ControlResult> delete_snapshot(std::string name) override;
  // A read-only view of snapshot `name` (cache/overlay_view.cpp).
  [[nodiscard]] std::unique_ptr<core::BlockDevice> snapshot_view(const std::string& name,
                                                                 std::shared_ptr<const void> keep) override;

  core::Task<core::ControlResult> flatten(uint64_t rate) override;
  core::Task<core::ControlResult> cancel_flatten() override;
  [[nodiscard]] core::FlattenProgress flatten_progress() const override;
  // Resumes a flatten the catalogue says was running (call once the export
  // is built; close() stops it again).
  void start();
  // Whether the catalogue of `store` records clone `name` as flattened.
  [[nodiscard]] static bool flattened_in(MetaStore& store, const std::string& name);
  // The clone's catalogue state of its flatten: "running RATE", "done", "cancelled".
  static constexpr const char* kFlattenKey = "flatten";
  // Blocks copied between two durable commits of a flatten.
  static constexpr uint64_t kFlattenCommitBytes = 8u << 20;

  [[nodiscard]] OverlayStats stats() const;
  [[nodiscard]] const std::string& base_name() const noexcept { return base_name_; }
  [[nodiscard]] std::string overlay_path() const { return chain()->levels.back()->path; }

 private:
  class Claims;       // the claimed blocks of one request, released on destruction
  class View;         // a snapshot's read-only view (cache/overlay_view.cpp)
  class WriterPass;   // a write inside the gate, left on destruction
  // One level of the chain: an overlay file and the blocks it holds.
  struct Level {
    std::string record;  // catalogue record (the clone's name for the top)
    std::string path;
    std::unique_ptr<core::BlockDevice> file;
    AtomicBitmap allocated;
  };
  // Immutable once published; replaced whole by snapshot, revert, delete.
  struct Chain {
    std::vector<std::shared_ptr<Level>> levels;  // oldest first; back() is the top
    std::vector<std::string> names;              // snapshot names of levels[0..n-2]
  };
  [[nodiscard]] std::shared_ptr<const Chain> chain() const { return chain_.load(std::memory_order_acquire); }
  std::shared_ptr<Level> open_level(const std::string& record, const std::string& path);
  std::shared_ptr<Level> new_top(const std::string& path);
  // Removes NAME.N.img files in the overlay directory that no record names.
  void sweep_unused_files();
  // A path for a new top file that no file uses.
  std::string fresh_path() const;
  // The index of the snapshot named `name` in c.names, or c.names.size().
  [[nodiscard]] static size_t find_snapshot(const Chain& c, const std::string& name);
  // Block status through levels [0, upto) and then the base: one run of
  // blocks in the same level per call (the caller asks again for the rest).
  core::Task<std::error_code> block_status_levels(const Chain& c, size_t upto, core::ByteRange range,
                                                  core::ExtentList& out);
  // Reads through levels [0, upto) and then the base.
  core::Task<std::error_code> read_levels(const Chain& c, size_t upto, std::span<std::byte> buf, uint64_t offset,
                                          core::IoFlags flags, bool count);
  core::Task<WriterPass> enter();
  void pause();
  core::Task<void> drain();
  void resume();
  core::Task<std::error_code> commit_locked();
  core::Task<std::error_code> merge_into_top(const Level& from, Level& top);
  core::Task<std::error_code> merge_into_frozen(const Level& from, Level& to);
  // Copies block b from `source` into the top under a claim, unless the top
  // has it (then, or when a writer took it meanwhile, *copied stays false).
  // All-zero data is punched as a hole. (merge_into_top, flatten)
  core::Task<std::error_code> copy_into_top(Level& top, uint64_t b, core::BlockDevice& source,
                                            std::vector<std::byte>& block, bool* copied);
  // The flatten task (cache/overlay_flatten.cpp) and its start.
  core::Task<void> run_flatten(std::shared_ptr<core::SharedEvent> done);
  void spawn_flatten();
  core::Task<void> stop_flatten();
  // Whether every block is held by some level (then the base is never read).
  [[nodiscard]] bool all_allocated(const Chain& c) const;
  void become_standalone();

  [[nodiscard]] uint64_t block_of(uint64_t offset) const noexcept { return offset / granularity_; }
  [[nodiscard]] core::ByteRange block_range(uint64_t b) const noexcept;
  // Claims every unallocated block of [first, last], ascending.
  core::Task<Claims> claim(const Level& top, uint64_t first, uint64_t last);
  // The same without a coroutine while no other request holds a block:
  // claims ascending up to the first block another request holds and
  // returns it (last + 1 when all are claimed); claim_rest() waits for the
  // rest. (The common, uncontended first write costs no frame.)
  uint64_t claim_now(const Level& top, uint64_t first, uint64_t last, Claims& claims);
  core::Task<void> claim_rest(const Level& top, uint64_t from, uint64_t last, Claims& claims);
  void release(uint64_t block) noexcept;
  // A pass through the write gate without a coroutine when it is open.
  std::optional<WriterPass> try_enter() noexcept;
  // Writes `data` at `offset` (inside block b, which the caller claimed if it
  // was unallocated): directly if b is allocated or data covers it, else the
  // block merged with the base's bytes around it (copy-up).
  core::Task<std::error_code> write_in_block(const Chain& c, uint64_t b, std::span<const std::byte> data,
                                             uint64_t offset);
  // write/zero: the common walk. `data` empty means zeroes.
  core::Task<std::error_code> change(std::span<const std::byte> data, core::ByteRange range, bool zeroes,
                                     core::IoFlags flags);
  void mark_allocated(Level& top, uint64_t first, uint64_t last) noexcept;
  // The group commit behind flush and FUA.
  core::Task<std::error_code> commit();

  std::shared_ptr<core::CheckedDevice> base_;
  std::string name_, base_name_, uri_;
  OverlayConfig cfg_;
  MetaStore& store_;
  boost::asio::thread_pool& blocking_;
  std::shared_ptr<spdlog::logger> log_;
  core::Geometry geometry_;
  uint64_t granularity_;
  uint64_t nblocks_;
  std::string path_;  // the top's file when the layer opened
  std::function<std::unique_ptr<core::BlockDevice>(const std::string& path)> open_file_;

  std::atomic<std::shared_ptr<const Chain>> chain_;  // its top's bits are authoritative for reads
  AtomicBitmap pending_;    // top blocks allocated since the last commit took them
  std::vector<uint64_t> durable_;  // what the catalogue holds (under commit_mutex_)

  std::mutex claim_mutex_;
  // Claimed blocks; the event is made by the first request that waits for
  // the block (an uncontended claim allocates none).
  std::unordered_map<uint64_t, std::shared_ptr<core::SharedEvent>> claims_;

  core::AsyncMutex commit_mutex_;
  core::AsyncMutex ops_mutex_;
  std::atomic<long> writers_{0};
  std::atomic<bool> paused_{false};
  std::mutex gate_mutex_;
  std::shared_ptr<core::SharedEvent> resume_;  // set while paused
  std::atomic<uint64_t> commits_started_{0};
  std::atomic<uint64_t> last_good_commit_{0};  // number of the last commit that succeeded

  std::atomic<uint64_t> base_reads_{0}, base_read_bytes_{0}, overlay_reads_{0}, overlay_read_bytes_{0};
  std::atomic<uint64_t> copy_ups_{0}, commits_{0};
  bool recovered_ = false;
  // Flatten: state and pacing (atomics: stats read them from any thread).
  std::optional<boost::asio::any_io_executor> background_;
  std::atomic<core::FlattenState> flatten_state_{core::FlattenState::none};
  std::atomic<uint64_t> flatten_rate_{0}, flatten_copied_{0};
  std::atomic<bool> flatten_stop_{false};
  std::shared_ptr<core::SharedEvent> flatten_done_;  // set when the task ends (under ops_mutex_)
  mutable std::mutex flatten_error_mutex_;
  std::string flatten_error_;
  std::atomic<bool> standalone_{false};  // no level operation reads the base any more
  std::atomic<bool> hold_{false};        // the base's read-only hold is ours
  bool injected_ = false;  // overlay files opened by the test's opener
  bool closed_ = false;
};

}  // namespace blockway::cache
