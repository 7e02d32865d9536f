// MetaStore: the daemon's SQLite catalogue of caches: one row per cached
// export (its remote, size, chunk size, cache file, write mode, clean-shutdown
// flag) and its bitmaps (present, dirty, write-intent) stored as 4 KiB pages.
//
// Only pages that changed are written, in one transaction per commit, and a
// commit happens at checkpoints and flushes, never once per I/O.
//
// Besides the bitmaps: a small per-export key/value state (detached, the
// prefetch that should run after a restart, its rate), and the access
// profile: per daemon run ("session"), the chunks in the order clients first
// read them, appended in batches at checkpoints (for hot-first prefetch).
// For the daemon: the exports added at run time (runtime_exports) and the
// settings changed at run time (runtime_settings), both outside what a cache
// reset forgets.
//
// Thread model: every method takes the store's mutex; commits may block on
// fsync, so the cache layer calls them from the blocking pool.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

struct sqlite3;

namespace blockway::cache {

struct CacheRecord {
  std::string name;        // export name
  std::string remote;      // backend URI the cache belongs to
  std::string cache_path;  // the cache file (a raw image of the remote's size)
  std::string mode;        // write mode
  uint64_t size = 0;
  uint64_t chunk_size = 0;
  bool clean = true;  // false while the daemon runs: true only after a clean stop
};

// An export added at run time through the control socket; the daemon opens
// these again at start. `options` is the option list as written after the URI
// on --export ("ro,cache=/var/cache/vm1,mode=writeback").
struct RuntimeExport {
  std::string name;
  std::string uri;
  std::string options;
};

// A setting changed at run time through the control socket (the write mode,
// the prefetch rate) of an export from the configuration, with the value the
// configuration had when it was changed: at start the run-time value applies
// while the configuration still says `config_value`.
struct RuntimeSetting {
  std::string key;  // "mode", "prefetch-rate"
  std::string value;
  std::string config_value;
};

enum class BitmapKind : int { present = 0, dirty = 1, intent = 2 };

class MetaStore {
 public:
  static constexpr size_t kWordsPerPage = 512;  // 4 KiB of bits per row

  // Opens (creating if needed) the catalogue. Every method throws
  // std::runtime_error (naming the catalogue and SQLite's message) when a
  // statement cannot be prepared, bound or run.
  explicit MetaStore(const std::string& path);
  ~MetaStore();
  MetaStore(const MetaStore&) = delete;
  MetaStore& operator=(const MetaStore&) = delete;

  // Run-time exports, in the order they were added.
  std::vector<RuntimeExport> runtime_exports();
  // Inserts or replaces; throws std::runtime_error.
  void save_runtime_export(const RuntimeExport& e);
  // Returns false if there was none by that name.
  bool remove_runtime_export(const std::string& name);
  // Replaces the option list of a run-time export (keeping its place in the
  // order); returns false if there is none by that name.
  bool update_runtime_export_options(const std::string& name, const std::string& options);

  // Kernel NBD devices the daemon attached (/dev/nbdN -> its description as
  // the daemon writes it), for the next start to reconnect them.
  std::vector<std::pair<uint32_t, std::string>> kernel_devices();
  void save_kernel_device(uint32_t index, const std::string& record);
  void remove_kernel_device(uint32_t index);

  // Run-time settings of configured exports (kept apart from the cache's own
  // state, which a cache reset forgets).
  std::vector<RuntimeSetting> runtime_settings(const std::string& name);
  void save_runtime_setting(const std::string& name, const RuntimeSetting& setting);
  void forget_runtime_setting(const std::string& name, const std::string& key);
  // Every run-time setting of the export (export-remove); returns how many.
  size_t forget_runtime_settings(const std::string& name);

  std::optional<CacheRecord> find(const std::string& name);
  // The files every record names (caches, overlays, snapshots).
  std::vector<std::string> cache_paths();
  // Inserts or replaces the record and forgets its bitmaps.
  void reset(const CacheRecord& record);
  void set_clean(const std::string& name, bool clean);
  void set_mode(const std::string& name, const std::string& mode);
  // Words of a bitmap (missing pages read as zero); words are stored in host
  // (little-endian) order.
  std::vector<uint64_t> load_bitmap(const std::string& name, BitmapKind kind, size_t nwords);

  struct PageWrite {
    BitmapKind kind;
    uint32_t page;
    std::vector<uint64_t> words;  // kWordsPerPage or fewer (last page)
  };
  // Writes pages (and optionally the clean flag) in one durable transaction.
  void commit(const std::string& name, const std::vector<PageWrite>& pages, std::optional<bool> clean);
  // The remote grew: the record's size becomes `size` and `pages` are
  // written, in one durable transaction (a crash leaves the old record or
  // the new one, never a mix).
  void grow(const std::string& name, uint64_t size, const std::vector<PageWrite>& pages);

  // Per-export state ("detached", "prefetch", ...); reset() forgets it.
  std::optional<std::string> get_state(const std::string& name, const std::string& key);
  void set_state(const std::string& name, const std::string& key, const std::string& value);

  // Snapshots of clone overlays (cache/overlay_layer.hpp), each change in one
  // durable transaction, so a crash leaves the old or the new chain.
  // freeze_overlay: the clone's overlay (its record and bits) becomes the
  // record `frozen` (mode "overlay-snapshot"), the clone's record points at
  // the new, empty overlay file `new_path`, and its chain state is `chain`.
  void freeze_overlay(const std::string& name, const std::string& frozen, const std::string& new_path,
                      const std::string& chain);
  // The clone's overlay bits are forgotten and its record points at `new_path`.
  void replace_overlay(const std::string& name, const std::string& new_path);
  // The record `dropped` (with its bits and state) is forgotten and the
  // clone's chain state is `chain`.
  void drop_snapshot(const std::string& name, const std::string& dropped, const std::string& chain);

  // Access profile. begin_session() returns a new session number and keeps
  // only the newest `keep` sessions before it.
  static constexpr int kKeepSessions = 4;
  int64_t begin_session(const std::string& name, int keep = kKeepSessions);
  void append_profile(const std::string& name, int64_t session, int64_t batch, const std::vector<uint32_t>& chunks);
  // Every stored session's chunks in first-read order, newest session first.
  std::vector<std::vector<uint32_t>> load_profiles(const std::string& name);
  // In one transaction: forgets every session of the export but `current`
  // (the running one, whose reads keep being appended) and stores `older`
  // (newest first) as the sessions just before it (current - 1, current - 2,
  // ...): what `blockway profile import` and `cache drop` without
  // --keep-profile (older empty) do.
  void replace_profiles(const std::string& name, int64_t current, const std::vector<std::vector<uint32_t>>& older);

 private:
  void exec(const char* sql);
  void create_runtime_tables();
  void commit_with_size(const std::string& name, const std::vector<PageWrite>& pages, std::optional<bool> clean,
                        std::optional<uint64_t> size);
  std::mutex mutex_;
  sqlite3* db_ = nullptr;
  std::string path_;
};

}  // namespace blockway::cache
