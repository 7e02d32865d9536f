// CacheLayer: a local-disk sector cache in front of a remote device.
//
// The cache file is a raw image of the remote's exact size (sparse unless
// preallocated), so a complete cache is itself a usable image. The image is
// cut into chunks (power of two, default 64 KiB) with three bitmaps, kept in
// memory and persisted to the MetaStore at checkpoints:
//   present  - the chunk's bytes in the cache file are the image's bytes;
//   dirty    - the cache holds data the remote does not have yet;
// With a capacity, clean chunks are evicted (CLOCK, an LRU approximation):
// their present bit is cleared and persisted before their bytes are punched
// out of the cache file, and readers that saw them present finish first
// (EpochGuard). Dirty chunks are never evicted.
//   intent   - per region of 64 chunks: writes may be changing cache data
//              here. Persisted *before* a write touches the cache file, so
//              after an unclean stop every present chunk of such a region
//              that is not persisted dirty is dropped (refetched): it may
//              hold a write that never became durable or never reached the
//              remote. This is what makes kill -9 and power loss safe
//              without one metadata transaction per write.
// Ordering rules (DESIGN.md invariant 3): a present bit is persisted only
// after an fdatasync of the cache file that followed the fill; a dirty bit is
// persisted no later than the FLUSH/FUA that covers it; a dirty bit is
// cleared only after the remote acknowledged the write-back *and* a remote
// flush after it.
//
// Absent chunks have at most one "populator" at a time (a fetch, or a write
// that covers the whole chunk), registered in a sharded map; everyone else
// waits for it. Present chunks need no coordination on the data path: reads
// of fully present ranges touch only atomics and the cache file. Writethrough
// write/zero/trim and each write-back run also claim present chunks, so a
// write-back never copies a chunk while a writethrough update of it is
// between the remote and the cache file.
//
// Prefetch (cache/prefetcher.hpp) copies every absent chunk in the
// background through the same claims. Detach switches the export to local
// mode once every chunk is present and nothing is dirty: requests are held at
// the door (switching_) while those in flight drain, the state is persisted
// ("detached" in the catalogue), and from then on requests go straight to the
// cache file and the remote is closed. The door is never held across remote
// I/O: write-back happens with it open; a detach that finds chunks dirtied
// again behind the closed door opens it, writes back and tries again
// (kSwitchAttempts, then EAGAIN "busy"); set_mode to writethrough switches
// first and writes back after, with requests flowing. After a restart, open_if_detached()
// gives the daemon a stand-in for the remote, so it is never opened again.
//
// Thread model: every method may be called from any event-loop thread.
// Bitmaps are atomics; the populator map is sharded with one mutex per
// shard (held only for map operations, never across I/O); write-back passes
// are serialised by an AsyncMutex; checkpoints are group-committed under
// another AsyncMutex and do their fsync and SQLite work on the blocking pool.
// Lock order: control_mutex_ before writeback_mutex_ before
// checkpoint_mutex_; shard mutexes are leaves. The image may grow while
// served (grow_while_served, cache/cache_grow.cpp): the bitmaps never move
// and the sizes are atomics, so none of the above changes for it.
#pragma once

#include "cache/bitmap.hpp"
#include "cache/cache_config.hpp"
#include "cache/direct_writer.hpp"
#include "cache/meta_store.hpp"
#include "core/async_mutex.hpp"
#include "core/block_device.hpp"
#include "core/remote_bandwidth.hpp"
#include "core/export_control.hpp"
#include "core/logging.hpp"
#include "core/shared_event.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/thread_pool.hpp>

#include <array>
#include <chrono>
#include <functional>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace blockway::cache {

struct CacheStats {
  // hits/misses count read requests (served wholly from the cache, or not);
  // bytes_fetched counts every fetch, also those that merge a partial write
  // or zero into a chunk that was absent.
  uint64_t hits = 0, misses = 0;
  uint64_t bytes_fetched = 0, bytes_written_back = 0;
  uint64_t present_bytes = 0, dirty_bytes = 0;
  uint64_t chunk_size = 0, chunks = 0;
  uint64_t writeback_errors = 0, fetch_errors = 0;
  uint64_t evicted_bytes = 0, capacity = 0;
  uint64_t evictions = 0;        // chunks evicted
  uint64_t file_bytes = 0;       // allocated size of the cache file (st_blocks)
  uint64_t failed_requests = 0;  // client requests failed here (logged at warn)
  // The remote lost acknowledged writes in a reconnect (reports), and how
  // many chunks the cache wrote again because of it.
  uint64_t lost_write_reports = 0, replayed_chunks = 0;
  bool recovered = false;  // the last start followed an unclean stop
};

class Prefetcher;

// The stand-in remote of an export that was detached (local mode), built
// from the catalogue, or nullptr if the export is not detached or its remote
// URI changed (then the remote is opened and the cache starts over). Every
// I/O on the stand-in fails with ENOTCONN; the cache layer never calls it.
std::unique_ptr<core::BlockDevice> open_if_detached(MetaStore& store, const std::string& export_name,
                                                       const std::string& remote_uri);

class CacheLayer final : public core::Layer, public core::ExportControl {
 public:
  struct Params {
    std::string export_name;
    std::string remote_uri;
    CacheConfig config;
    MetaStore* store = nullptr;
    boost::asio::thread_pool* blocking = nullptr;
    boost::asio::any_io_executor background;  // where write-back and checkpoints run
    // The daemon-wide remote bandwidth cap, if any: the prefetch takes its
    // budget there before it claims chunks (so client reads never wait behind
    // a claimed chunk whose fill waits for budget).
    std::shared_ptr<core::RemoteBandwidth> remote_bandwidth;
    // Opens the cache image at a path; the default is a FileDevice on a
    // sparse file created here. Tests pass a device that simulates power loss.
    std::function<std::unique_ptr<core::BlockDevice>(const std::string& path)> open_cache_file;
  };

  // Opens or creates the cache file and its metadata; after an unclean stop,
  // drops what may be stale. Throws std::runtime_error with a clear message.
  CacheLayer(std::unique_ptr<core::BlockDevice> remote, Params params);
  ~CacheLayer() override;

  [[nodiscard]] core::Capabilities capabilities() const noexcept override;
  [[nodiscard]] std::string describe() const override;

  core::Task<std::error_code> read(std::span<std::byte> buf, uint64_t offset, core::IoFlags flags) override;
  core::Task<std::error_code> write(std::span<const std::byte> buf, uint64_t offset,
                                       core::IoFlags flags) override;
  core::Task<std::error_code> flush() override;
  core::Task<std::error_code> trim(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> zero(core::ByteRange range, core::IoFlags flags) override;
  core::Task<std::error_code> block_status(core::ByteRange range, core::ExtentList& out) override;
  core::Task<std::error_code> prefetch(core::ByteRange range) override;
  core::Task<void> close() override;
  // Stops background work without persisting anything or marking the cache
  // clean: what a crash leaves behind (tests), and the first half of close().
  core::Task<void> abandon();

  // Present/dirty state of [range] as extents: flag 1 = present, 2 = dirty.
  core::Task<std::error_code> cache_status(core::ByteRange range, core::ExtentList& out);
  [[nodiscard]] CacheStats stats() const;
  [[nodiscard]] WriteMode mode() const noexcept { return mode_.load(std::memory_order_acquire); }
  [[nodiscard]] bool detached() const noexcept { return local_.load(std::memory_order_acquire); }
  // Starts the background write-back / checkpoint loop (on `background`),
  // and the prefetch if configured or persisted as running.
  void start();

  // For a simulated crash in tests (an unclean stop with the layer's loops
  // stopped, not yet destroyed): drops the events the layer owns (its fills'
  // and its background work's), and with them the coroutine frames waiting
  // on them, whose destruction is posted to their loops. Those frames point
  // into the layer (an in-flight count, a claim), so the caller destroys
  // them there (the loop's shutdown) before it destroys the layer; a layer
  // destroyed first would leave them pointing into freed memory, a loop
  // destroyed first would take posts after its end. Not for serving: the
  // requests those frames ran never answer.
  void abandon_waiters();

  // ExportControl.
  [[nodiscard]] core::CacheReport report() const override;
  core::ControlResult prefetch_start(core::PrefetchOrder order) override;
  core::ControlResult prefetch_pause() override;
  core::ControlResult prefetch_resume() override;
  core::ControlResult prefetch_set_rate(uint64_t bytes_per_second) override;
  core::Task<core::ControlResult> detach(bool force) override;
  core::Task<core::ControlResult> set_mode(std::string_view mode) override;

  // Access profile (cache/cache_profile.cpp): the first-read order of the
  // export's sessions, for hot-first prefetch, moved between hosts by
  // `blockway profile export/import`.
  struct Profile {
    uint64_t chunk_size = 0;
    uint64_t chunks = 0;                         // chunks of the image
    std::vector<std::vector<uint32_t>> sessions;  // newest first, chunks in first-read order
  };
  // The stored sessions, the running one's first reads saved first.
  core::Task<std::pair<std::error_code, Profile>> profile();
  // Replaces every session before the running one by `sessions` (newest
  // first, chunks of this cache): the next hot-first prefetch fetches them
  // first. EPERM when detached (nothing left to prefetch).
  core::Task<core::ControlResult> import_profile(std::vector<std::vector<uint32_t>> sessions);
  // Empties the cache (present bits cleared and persisted, the cache file
  // punched) while clients go on, and starts a new profile session. Refused
  // (EBUSY, naming what to run) while chunks are dirty or the prefetch runs,
  // EPERM when detached. Without keep_profile the stored profile is
  // forgotten too.
  core::Task<core::ControlResult> drop(bool keep_profile);
  // Like read(), but not recorded in the access profile: the daemon's own
  // reads (a profile's image identity), not a client's.
  core::Task<std::error_code> read_unrecorded(std::span<std::byte> buf, uint64_t offset);
  [[nodiscard]] uint64_t chunk_size() const noexcept { return uint64_t{1} << chunk_shift_; }
  [[nodiscard]] uint64_t chunk_count() const noexcept { return nchunks_.load(std::memory_order_acquire); }
  // The image's size as the cache serves it (grows with grow_while_served()).
  [[nodiscard]] uint64_t image_size() const noexcept { return size_.load(std::memory_order_acquire); }

  // The remote grew to new_size while the export is served (rbd resize):
  // the cache grows in place, keeping every chunk it holds (dirty ones too);
  // the new chunks are absent. Returns an empty string once requests up to
  // new_size may come (the caller then grows the export's bounds), else why
  // the cache keeps its size. Crash-safe in the order of grow_cache(): the
  // cache file is extended and synced, then the record's size committed.
  // See "growing while served" below for which readers were made safe.
  core::Task<std::string> grow_while_served(uint64_t new_size);
  // Why grow_while_served(new_size) would refuse, as far as can be told now
  // without waiting (empty: it would try); any thread, no locks.
  [[nodiscard]] std::string grow_refusal(uint64_t new_size) const;
  // Deferred fills (write-back modes) at a time; past it, a write that covers
  // an absent chunk in part fetches the chunk first.
  static constexpr uint64_t kMaxDeferred = 64;
  // A deferred fill's grace before its fetch (cache_deferred_fill.cpp): it
  // looks every `step` and fetches once a step passed with no write joining
  // it, a read or FLUSH waits for it, or `max` passed. Tests lengthen it.
  struct DeferredGrace {
    std::chrono::microseconds step{250};
    std::chrono::microseconds max{4000};
  };
  void set_deferred_grace(DeferredGrace g) noexcept { grace_ = g; }

 private:
  // read() flag (never from a client, who reaches this layer through the
  // CheckedDevice): leave the access profile alone.
  static constexpr core::IoFlags kUnrecorded = 1u << 12;
  // Under checkpoint_mutex_: saves the running session's unsaved first reads
  // and starts a new, empty session (forgetting the stored ones unless keep).
  core::Task<std::error_code> new_profile_session(bool keep);

  friend class Prefetcher;
  struct Fill;  // one populator's claim on a set of absent chunks
  struct Shard {
    std::mutex mutex;
    std::unordered_map<uint64_t, std::shared_ptr<Fill>> fills;
  };
  static constexpr uint64_t kChunksPerRegion = 64;
  // How far ahead of a sequential writer ensure_intent() marks regions, in
  // bytes (at least one region): a count of regions would be 1 GiB each with
  // 16 MiB chunks, and a crash drops the clean chunks of every marked region.
  static constexpr uint64_t kIntentAheadBytes = 32u << 20;
  // Detach and set_mode: how often the door may close and find chunks
  // dirtied again by clients during the write-back, or requests in flight
  // that do not drain, before the switch answers EAGAIN (busy). set_mode to
  // writethrough: also the write-back rounds before it gives up.
  static constexpr int kSwitchAttempts = 5;
  static constexpr size_t kShards = 64;

  [[nodiscard]] uint64_t chunk_of(uint64_t offset) const noexcept { return offset >> chunk_shift_; }
  [[nodiscard]] uint64_t chunk_start(uint64_t c) const noexcept { return c << chunk_shift_; }
  [[nodiscard]] uint64_t chunk_len(uint64_t c) const noexcept;
  Shard& shard(uint64_t c) noexcept { return shards_[c % kShards]; }

  // Fetches what is absent of chunks [first, last] (one populator per chunk),
  // for read-ahead and NBD_CMD_CACHE: they may be evicted again at once.
  core::Task<std::error_code> populate(uint64_t first, uint64_t last);
  // Claims the absent chunks of [first, last] for the caller (all of them
  // with present_too), waiting for other claimers; returns the claimed chunks.
  // With `deferred_seen`, a chunk held by a deferred fill (below) is not
  // waited for but noted there, for the caller to join.
  using DeferredSeen = std::vector<std::pair<uint64_t, std::shared_ptr<Fill>>>;
  core::Task<std::pair<std::shared_ptr<Fill>, std::vector<uint64_t>>> claim(uint64_t first, uint64_t last,
                                                                              bool present_too = false,
                                                                              DeferredSeen* deferred_seen = nullptr);
  void release(const std::shared_ptr<Fill>& fill, const std::vector<uint64_t>& chunks, std::error_code ec);
  // True if every chunk of [first, last] is present or in `mine` (sorted).
  [[nodiscard]] bool chunks_ready(uint64_t first, uint64_t last, const std::vector<uint64_t>& mine) const noexcept;
  // Fetches chunks [first, last] (claimed by the caller) from the remote,
  // writes them to the cache file and marks them present. flags: kBackground
  // for the prefetch's fills (the remote bandwidth cap's background class),
  // else 0. A read miss passes `out`, the part of its reply buffer at byte
  // `out_offset` that lies in the run: the fetched bytes are delivered there
  // (fetched straight into it when it is the whole run, else copied from a
  // pooled buffer), so the reply needs no read of the cache file afterwards.
  core::Task<std::error_code> fetch_run(uint64_t first, uint64_t last, core::IoFlags flags = 0,
                                        std::span<std::byte> out = {}, uint64_t out_offset = 0);
  // Writes a fill's fetched bytes at `offset` of the cache file. A run the
  // reply holds whole (`reply_has_it`) goes to the disk with O_DIRECT when
  // it is 4 KiB-aligned in the file and in memory: no page-cache copy, no
  // new pages zeroed (a cold read's largest costs); the reader has the bytes
  // already, and a later hit reads them from the disk. Everything else (read-
  // ahead and prefetch fills, whose bytes are about to be read) is buffered,
  // in pieces of at most 64 KiB (see fetch_run).
  core::Task<std::error_code> write_fill(std::span<const std::byte> bytes, uint64_t offset, bool reply_has_it);
  // Reads [offset, offset + into.size()) from the remote in max_transfer pieces.
  core::Task<std::error_code> fetch_bytes(std::span<std::byte> into, uint64_t offset, core::IoFlags flags);

  // Deferred fills (cache/cache_deferred_fill.cpp): in the write-back modes a
  // write that covers an absent chunk only in part writes its bytes at once
  // and is answered; the chunk's fetch runs behind it and fills only the
  // bytes no write covered, then the chunk becomes present and dirty.
  // Under the claim of `mine` (sorted): the absent chunks at either end of
  // `range` that it covers only in part and may be deferred (budget taken).
  std::vector<uint64_t> deferrable_ends(core::ByteRange range, const std::vector<uint64_t>& mine);
  // Joins every fill of `seen` for `range` (all or none); returns the first
  // one that is completing, if any (then wait for its done and try again).
  std::shared_ptr<Fill> join_deferred(const DeferredSeen& seen, core::ByteRange range);
  // Turns the claimed chunks `defer` into deferred fills joined by the caller
  // for `range`, appending them to `joined`, and starts their fetches.
  void start_deferred(const std::vector<uint64_t>& defer, const std::shared_ptr<Fill>& claim_fill,
                      core::ByteRange range, DeferredSeen& joined);
  void leave_deferred(const DeferredSeen& joined, std::error_code ec);
  // A read or FLUSH about to wait for the fill's fetch: ends its grace now
  // (the fetch starts) and returns the current attempt to wait on.
  std::shared_ptr<core::SharedEvent> urge_deferred(const std::shared_ptr<Fill>& f);
  // Ends the grace wait of f's runner, if it waits (under f's mutex).
  void wake_runner(const std::shared_ptr<Fill>& f);
  // The fill's fetch (tried again until it works, writes cover the chunk or
  // the layer stops); then, or when the last joined write leaves after it,
  // complete_deferred() merges the chunk and releases the claim.
  core::Task<void> run_deferred(uint64_t c, std::shared_ptr<Fill> pf);
  core::Task<void> complete_deferred(uint64_t c, std::shared_ptr<Fill> pf);
  // runner: the fill's run_deferred(), counted in deferred_runners_.
  void spawn_deferred(core::Task<void> task, uint64_t c, bool runner = false);
  // Waits until every deferred fill of chunks [first, last] that exists now
  // has completed; EIO if one of them failed its fetch meanwhile (it goes on
  // trying, the written bytes stay) or a deferred fill lost its writes.
  core::Task<std::error_code> settle_deferred(uint64_t first, uint64_t last);
  std::atomic<uint64_t> deferred_{0};      // deferred fills running (and budget taken)
  std::atomic<uint64_t> deferred_runners_{0};  // run_deferred() frames alive (close() waits for them)
  std::atomic<bool> deferred_loss_{false};  // a deferred fill gave up: the next FLUSH fails
  DeferredGrace grace_;                     // set before requests come (tests)
  void start_readahead(uint64_t after);

  // Write-intent for the regions of chunks [first, last], persisted before
  // the caller changes cache data there.
  core::Task<std::error_code> ensure_intent(uint64_t first, uint64_t last);
  class RegionWrites;  // RAII: counts writes in progress per region

  // Fetches the chunks at either end of `range` that it covers only in part,
  // if they are absent and claimed by the caller (in `mine`, sorted).
  core::Task<std::error_code> fetch_partial_ends(core::ByteRange range, const std::vector<uint64_t>& mine);
  // Fetches every chunk of `mine` (claimed by the caller, sorted) that is not
  // present, in runs of up to kMaxRun bytes.
  core::Task<std::error_code> fetch_absent(const std::vector<uint64_t>& mine);
  // A read that missed: claims every chunk of the range; under the claim,
  // reads the present runs from the cache file and fetches the absent ones
  // straight into the reply (fetch_run's `out`).
  core::Task<std::error_code> read_miss(std::span<std::byte> buf, uint64_t offset, uint64_t first, uint64_t last);
  // A write or zero that lost a present chunk to eviction this many times
  // claims the present chunks too (then none can be evicted under it).
  static constexpr int kClaimAllAfter = 2;
  void mark_referenced(uint64_t first, uint64_t last) noexcept;
  // A request that fails in this layer: logged at warn with the reason and
  // counted (CacheStats::failed_requests); returns ec.
  std::error_code request_failed(const char* what, uint64_t length, uint64_t offset, const char* where,
                                 std::error_code ec);
  core::Task<std::error_code> write_cached(std::span<const std::byte> buf, uint64_t offset,
                                              core::IoFlags flags);
  core::Task<std::error_code> write_through(std::span<const std::byte> buf, uint64_t offset,
                                               core::IoFlags flags);
  core::Task<std::error_code> zero_cached(core::ByteRange range, core::IoFlags flags, bool whole_chunks_only);
  // A write-back mode's write or zero of `range` into the cache file (done by
  // `change`, under the claims and joins it needs): `what` names the request
  // in errors, `partly`/`verb` the rest ("written"/"writing").
  core::Task<std::error_code> change_cached(core::ByteRange range, core::IoFlags flags, const char* what,
                                            const char* partly, const char* verb,
                                            const std::function<core::Task<std::error_code>()>& change);
  // After a writethrough change reached the remote but not the cache file:
  // drops the clean chunks of [first, last] (fetched again when read). Dirty
  // ones (inherited from a write-back mode) cannot be dropped without losing
  // their data: returns true if there were any, and the change then fails.
  bool drop_clean_chunks(uint64_t first, uint64_t last) noexcept;
  // The part of a writethrough change the cache file takes: `range` less the
  // absent chunks at either end that it covers only in part (empty if none
  // is left). Under the change's claim.
  [[nodiscard]] core::ByteRange cacheable_part(core::ByteRange range) const noexcept;
  // True if a chunk of [first, last] is dirty, being written back, or still
  // persisted dirty: after a power loss it would be written back from the
  // cache file, so a writethrough FUA there must make the cache file durable
  // too.
  [[nodiscard]] bool owes_write_back(uint64_t first, uint64_t last) const noexcept;
  // Durability of a FUA request over chunks [first, last], per write mode.
  core::Task<std::error_code> make_durable(uint64_t first, uint64_t last);

  // Writes dirty chunks of [first, last] to the remote and flushes it.
  core::Task<std::error_code> write_back(uint64_t first, uint64_t last);
  // Writes back and, where a persisted dirty bit could later resurrect older
  // bytes, syncs the cache and persists the clean bits: for FLUSH and FUA.
  core::Task<std::error_code> write_back_durably(uint64_t first, uint64_t last);
  core::Task<std::error_code> write_back_locked(uint64_t first, uint64_t last);
  // FUA for the remote: passed on if it has FUA, else done by a flush after.
  [[nodiscard]] core::IoFlags remote_fua(core::IoFlags flags) const noexcept;
  [[nodiscard]] bool needs_remote_flush(core::IoFlags flags) const noexcept;
  // Every remote flush goes through flush_remote(), and every remote write,
  // zero or trim calls remote_write_done() once it has ended: a FLUSH with
  // nothing to write back still flushes the remote if it may hold writes
  // no flush has covered yet (always so for the first one after open).
  //
  // Remote flushes are serialised and group-committed (a request is covered
  // by any flush that started after it). When the remote reports that writes
  // it acknowledged on a session that died were never flushed there
  // (writes_lost_error() from the RetryLayer), flush_remote() marks every
  // chunk written to the remote since the last successful flush dirty again,
  // so that write-back stores it again from the cache file on the new
  // session, and returns writes_lost_error(): the caller writes back and
  // flushes again (durable_on_remote). Writes whose bytes the cache does not
  // hold (a writethrough write that covers an absent chunk only in part)
  // cannot be written again: then the loss is sticky until a client FLUSH or
  // FUA reports it (EIO, logged at error).
  core::Task<std::error_code> flush_remote();
  void remote_write_done(core::IoFlags remote_flags, std::error_code ec) noexcept;
  [[nodiscard]] bool remote_flush_owed() const noexcept;
  // Around every remote write or zero (writethrough) and write-back run of
  // chunks [first, last], under their claim: begin before it is sent, end
  // once the cache file is in step (a writethrough change also wrote the
  // cache). `replayable`: the cache file now holds every byte the remote got
  // (the chunks are present); `durable`: FUA made it durable by itself. From
  // end to a successful remote flush that started later, replayable chunks
  // are pinned (never evicted) and remembered in case the remote loses them.
  [[nodiscard]] uint64_t remote_write_begin() const noexcept;
  void remote_write_end(uint64_t first, uint64_t last, uint64_t begun, bool replayable, std::error_code ec,
                        bool durable) noexcept;
  // Sends a writethrough change (send(remote_flags) returns its Task) with
  // FUA passed on or emulated by a flush; when that flush reports lost
  // writes, sends the change again on the new session (kReplayRounds).
  template <class Send>
  core::Task<std::error_code> remote_change(Send send, core::IoFlags flags);
  // Under flush_mutex_, after a flush reported lost writes: marks what the
  // cache can write again dirty; notes what it cannot (sticky loss).
  void replay_lost_writes();
  [[nodiscard]] bool pinned(uint64_t c) const noexcept;
  // The chunk's bytes leave the cache (dropped, trimmed): a write of it the
  // remote may still lose can no longer be written again.
  void forget_replayable(uint64_t c) noexcept;
  // Writes back [first, last] durably and flushes the remote (always, or
  // when owed), again as long as a flush reports lost writes that the cache
  // wrote again (kReplayRounds); then reports a sticky loss once. For FLUSH
  // and FUA.
  core::Task<std::error_code> durable_on_remote(uint64_t first, uint64_t last, bool always_flush);
  static constexpr int kReplayRounds = 4;
  // How long written chunks may stay pinned (with a capacity) before the
  // background loop flushes the remote to release them.
  static constexpr std::chrono::seconds kPinnedFlushInterval{1};
  // Reports (and clears) a loss of writes the cache could not write again:
  // EIO with a log line, once.
  std::error_code take_sticky_loss();
  // Copies chunks [a, b] from the cache file to the remote (no flush).
  core::Task<std::error_code> write_back_run(uint64_t a, uint64_t b);
  // Group-committed checkpoint: with sync_data, fdatasync the cache file and
  // persist present/dirty/intent; without, persist only new intents.
  core::Task<std::error_code> checkpoint(bool sync_data);
  core::Task<std::error_code> run_checkpoint(bool sync_data);
  // Adds to `out` the pages of bitmap `kind` where `now` differs from `saved`.
  static void add_changed_pages(BitmapKind kind, const std::vector<uint64_t>& now,
                                const std::vector<uint64_t>& saved, std::vector<MetaStore::PageWrite>& out);
  // Commits pages (and first reads of the access profile) on the blocking
  // pool; EIO (logged) if SQLite fails. Under checkpoint_mutex_.
  core::Task<std::error_code> commit_pages(const std::vector<MetaStore::PageWrite>& pages,
                                              const std::vector<uint32_t>& profile);
  core::Task<void> background_loop();
  // Capacity: evicts clean, unreferenced chunks (CLOCK) down to 90% of it.
  core::Task<void> evict();
  // Punches evicted chunks (and those an earlier pass had to leave) out of
  // the cache file; keeps in unpunched_ what it had to leave this time.
  core::Task<void> punch_evicted(std::vector<uint64_t> gone);
  // Persists the cleared present bits of `gone` (sorted; no data sync needed
  // to clear a bit) and punches the chunks that are absent, persisted absent
  // and unclaimed; returns the absent ones it could not punch now.
  core::Task<std::vector<uint64_t>> punch_absent(std::vector<uint64_t> gone);
  // Read side of eviction's grace period: while a guard lives, chunks seen
  // present stay in the cache file (eviction waits for guards of the epoch in
  // which it cleared their present bits). No-op without a capacity.
  class EpochGuard;
  // Growing while served (grow_while_served): every bitmap and the
  // per-region counters live in StableArrays reserved at open for an image of
  // up to kGrowReserveBytes (or the size at open, if larger), so growing
  // never moves them: requests, stats(), cache_status(), the background loop
  // (write-back, checkpoints, eviction), readahead and the prefetcher read
  // them without locks as before. nchunks_, nregions_ and size_ are atomics,
  // published only after the storage grew and the catalogue committed the
  // new size, and before the export's bounds (CheckedDevice) let a request
  // reach the new space; readers that loaded the old values work on the old
  // range. The saved_* page snapshots change under checkpoint_mutex_, which
  // the grow holds across its commit; control_mutex_ keeps it apart from
  // detach, set_mode, drop and close. Refused (with the reason): a detached
  // cache, a capacity that would start eviction (EpochGuard reads
  // capacity_chunks_ without a lock, so eviction cannot be switched on under
  // readers), and a size beyond the reservation.
  static constexpr uint64_t kGrowReserveBytes = uint64_t{64} << 40;  // 64 TiB
  // Extends the cache file to new_size (and preallocates, if configured) and
  // syncs it; 0 or the errno.
  int extend_cache_file(uint64_t old_size, uint64_t new_size);
  // Start-up: the remote is larger than the cache's record (it grew while
  // the export was not served): extends the cache file and commits the new
  // size; throws std::runtime_error.
  void grow_cache(const CacheRecord& have, uint64_t new_size, bool injected);
  // True if the record's persisted dirty bitmap has a bit set.
  static bool has_dirty(MetaStore& store, const CacheRecord& rec);
  void recover_after_unclean_stop();
  // After recovery: frees the disk space of every absent chunk.
  void punch_absent_chunks();

  // Prefetch: claims the absent chunks of [first, last], zeroes those the
  // remote reported as holes and fetches the rest; returns data bytes fetched.
  core::Task<std::error_code> prefetch_fill(uint64_t first, uint64_t last, uint64_t* fetched);
  // Starts writing bytes of the cache file to disk without waiting for them
  // (sync_file_range on the blocking pool); durability still comes only from
  // the fdatasync of a checkpoint.
  void start_writeback(uint64_t offset, uint64_t length);
  [[nodiscard]] bool is_hole(uint64_t c) const noexcept { return holes_.test(c) && !no_hole_.test(c); }
  void mark_remote_written(uint64_t first, uint64_t last) noexcept;
  // Chunks not present, excluding holes; bytes of chunks of a bitmap.
  [[nodiscard]] uint64_t chunks_bytes(uint64_t n) const noexcept;
  [[nodiscard]] uint64_t dirty_chunks() const noexcept;

  // Requests in flight and the door that detach / set_mode close while they
  // switch (quiesce): new requests wait, those in flight drain. The switch
  // itself never does remote I/O behind the closed door, and if the requests
  // in flight do not drain within kDoorDrainLimit (they wait on a slow or
  // absent remote), quiesce opens the door again and returns false: the
  // switch backs off and tries again. A client never waits at the door for
  // longer than that.
  class InFlight;
  static constexpr std::chrono::milliseconds kDoorDrainLimit{250};
  core::Task<void> wait_for_switch();
  core::Task<bool> quiesce();
  core::Task<void> switch_backoff(int attempt);
  void unquiesce();
  // The local-mode data path (after detach).
  core::Task<std::error_code> local_write(std::span<const std::byte> buf, uint64_t offset, core::IoFlags flags);
  core::Task<std::error_code> local_zero(core::ByteRange range, core::IoFlags flags);
  core::Task<std::error_code> zero_cache_file(core::ByteRange range, core::IoFlags flags);
  // Writethrough zero for a remote without native zero: writes of zeroes.
  core::Task<std::error_code> zero_through_by_writes(core::ByteRange range, core::IoFlags flags);
  core::Task<std::error_code> persist_state(std::string key, std::string value);
  // After a write or zero of chunks [first, last] into the cache file under
  // the claim of `mine`: dirty and present when it worked, else the clean
  // chunks it touched leave the cache.
  // Chunks in `deferred` (sorted) are left alone: their deferred fill settles them.
  void settle_cache_change(uint64_t first, uint64_t last, const std::vector<uint64_t>& mine, std::error_code ec,
                           const std::vector<uint64_t>& deferred = {}) noexcept;
  // Access profile: the first read of each chunk in this session.
  void record_first_reads(uint64_t first, uint64_t last);
  void open_cache_file();

  std::string name_;
  std::string remote_uri_;
  CacheConfig cfg_;
  MetaStore& store_;
  boost::asio::thread_pool& blocking_;
  boost::asio::any_io_executor background_;
  std::shared_ptr<core::RemoteBandwidth> remote_bandwidth_;  // the daemon-wide cap, or null
  std::shared_ptr<spdlog::logger> log_;

  core::Geometry geometry_;
  core::Capabilities remote_caps_;
  std::unique_ptr<core::BlockDevice> cache_file_;  // FileDevice on the cache image
  // A descriptor of the cache file for start_writeback(); shared with the
  // pool tasks that use it, so it outlives them.
  struct WritebackFd {
    int fd = -1;
    ~WritebackFd();
  };
  std::shared_ptr<WritebackFd> writeback_fd_;
  // The cache file opened with O_DIRECT, for the fills whose bytes a reply
  // already holds (write_fill): written from the reply buffer to the disk by
  // asynchronous I/O, not copied into the page cache. Null for a test's
  // device, a file system without O_DIRECT or a kernel without AIO;
  // direct_fills_ is cleared if the kernel refuses a direct write's
  // alignment (then every fill is buffered).
  std::unique_ptr<DirectWriter> direct_;
  std::atomic<bool> direct_fills_{true};
  std::string cache_path_;
  bool injected_file_ = false;  // Params::open_cache_file: a test's device, not a file here to extend
  unsigned chunk_shift_ = 16;
  // Atomics: they grow while served (grow_while_served); see there.
  std::atomic<uint64_t> nchunks_{0};
  std::atomic<uint64_t> nregions_{0};
  std::atomic<uint64_t> size_{0};  // the image's size; geometry_.size is the size at open

  AtomicBitmap present_, dirty_, cleaning_, intent_, intent_persisted_, touched_;
  AtomicBitmap dirty_persisted_;  // dirty bits as last persisted
  StableArray<std::atomic<uint32_t>> region_writes_;
  std::array<Shard, kShards> shards_;

  // Last persisted words, to write only changed pages (checkpoint_mutex_).
  std::vector<uint64_t> saved_present_, saved_dirty_, saved_intent_;
  core::AsyncMutex checkpoint_mutex_;
  std::atomic<uint64_t> checkpoint_requested_{0};
  uint64_t checkpoint_done_ = 0;  // under checkpoint_mutex_
  std::atomic<uint64_t> checkpoint_done_sync_{0};
  core::AsyncMutex writeback_mutex_;

  std::atomic<bool> stopping_{false};
  std::shared_ptr<core::SharedEvent> background_done_;
  std::atomic<uint64_t> last_miss_end_{UINT64_MAX};
  std::atomic<int> readaheads_{0};

  // Eviction (only with a capacity).
  uint64_t capacity_chunks_ = 0;
  AtomicBitmap referenced_;
  uint64_t clock_hand_ = 0;  // background loop only
  std::vector<uint64_t> unpunched_;  // background loop only: evicted, not punched yet
  std::atomic<uint32_t> epoch_{0};
  std::atomic<int64_t> epoch_active_[2] = {0, 0};
  std::atomic<uint64_t> evicted_{0};

  // Remote writes ended / how many of them the last successful remote flush
  // covered. Starts unequal: what the remote holds unflushed from before
  // this open (a previous run's writes in flight at a crash, say) is
  // unknown, and a client may already have read it.
  std::atomic<uint64_t> remote_writes_{1}, remote_writes_flushed_{0};

  // Remote writes not yet covered by a successful remote flush, by flush
  // epoch: a flush flips flush_epoch_ when it starts and, when it succeeds,
  // forgets the epoch it flipped away from (a write notes itself after its
  // remote acknowledgement, in the epoch current then, so a flush never
  // forgets a write it does not cover). `chunks`/`noted`: writes the cache
  // can store again; `unreplayable`: those it cannot.
  struct UnflushedWrites {
    AtomicBitmap chunks;
    std::mutex mutex;  // noted
    std::vector<uint64_t> noted;
    std::atomic<uint64_t> unreplayable{0};
  };
  std::array<UnflushedWrites, 2> unflushed_;
  std::atomic<uint32_t> flush_epoch_{0};
  core::AsyncMutex flush_mutex_;
  std::atomic<uint64_t> flush_requested_{0};
  uint64_t flush_attempted_ = 0;  // under flush_mutex_: the last flush covered tickets up to this
  std::error_code flush_result_;  // under flush_mutex_: and returned this
  std::atomic<int64_t> last_remote_flush_{0};  // steady_clock ns of the last successful one
  std::atomic<bool> sticky_loss_{false};
  std::atomic<uint64_t> replayed_chunks_{0}, lost_write_reports_{0};

  mutable std::atomic<uint64_t> hits_{0}, misses_{0}, fetched_{0}, written_back_{0}, wb_errors_{0},
      fetch_errors_{0}, failed_requests_{0}, evictions_{0};
  bool recovered_ = false;

  std::atomic<WriteMode> mode_;
  std::atomic<bool> local_{false};
  std::atomic<bool> remote_closed_{false};
  std::atomic<bool> switching_{false};
  std::atomic<int64_t> inflight_{0};
  std::atomic<int64_t> last_request_end_{0};  // steady_clock ns, for the prefetcher's yield
  std::mutex switch_mutex_;
  std::shared_ptr<core::SharedEvent> switch_done_;  // under switch_mutex_
  core::AsyncMutex control_mutex_;  // one detach / set_mode at a time

  // Holes: what the prefetcher's block-status scan found reading as zero at
  // the remote; no_hole_: chunks written to the remote since (sticky).
  AtomicBitmap holes_, no_hole_;

  // Access profile of this session (bounded), saved at checkpoints.
  static constexpr size_t kMaxProfile = 1u << 16;
  AtomicBitmap seen_;
  std::mutex profile_mutex_;
  std::vector<uint32_t> profile_;
  size_t profile_saved_ = 0;      // under checkpoint_mutex_
  int64_t profile_batch_ = 0;     // under checkpoint_mutex_
  int64_t session_ = 0;

  std::unique_ptr<Prefetcher> prefetcher_;
};

}  // namespace blockway::cache
