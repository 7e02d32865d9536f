// MetaStore: the daemon's SQLite catalogue of caches: one row per cached
// export (its remote, size, chunk size, cache file, write mode, clean-shutdown
// flag) and its bitmaps (present, dirty, write-intent) stored as 4 KiB pages.
//
// Only pages that changed are written, in one transaction per commit, and a
// commit happens at checkpoints and flushes, never once per I/O.
//
// Thread model: every method takes the store's mutex; commits may block on
// fsync, so the cache layer calls them from the blocking pool.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
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

enum class BitmapKind : int { present = 0, dirty = 1, intent = 2 };

class MetaStore {
 public:
  static constexpr size_t kWordsPerPage = 512;  // 4 KiB of bits per row

  // Opens (creating if needed) the catalogue. Throws std::runtime_error.
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

  std::optional<CacheRecord> find(const std::string& name);
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

 private:
  void exec(const char* sql);
  std::mutex mutex_;
  sqlite3* db_ = nullptr;
  std::string path_;
};

}  // namespace blockway::cache
