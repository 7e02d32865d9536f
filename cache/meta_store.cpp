#include "cache/meta_store.hpp"

#include <sqlite3.h>

#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>

namespace blockway::cache {
namespace {

// One prepared statement, finalised when it goes out of scope. Every SQLite
// call is checked: a failed prepare (a table of another schema, a locked or
// corrupt file), bind or step throws std::runtime_error naming the catalogue,
// what was being done and SQLite's message, instead of reading as "no rows".
class Statement {
 public:
  Statement(sqlite3* db, const std::string& path, const char* what, const char* sql)
      : db_(db), path_(path), what_(what) {
    if (sqlite3_prepare_v2(db_, sql, -1, &stmt_, nullptr) != SQLITE_OK) fail();
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  // Binds parameters 1, 2, ... in order. Blobs are not copied: they must
  // outlive the step.
  Statement& bind(const std::string& v) { return check(sqlite3_bind_text(stmt_, next(), v.c_str(), -1, SQLITE_TRANSIENT)); }
  Statement& bind(int64_t v) { return check(sqlite3_bind_int64(stmt_, next(), v)); }
  Statement& bind_blob(const void* data, size_t bytes) {
    return check(sqlite3_bind_blob(stmt_, next(), data, static_cast<int>(bytes), SQLITE_STATIC));
  }

  // True with a row to read, false when done.
  bool step() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc != SQLITE_DONE) fail();
    return false;
  }
  // Steps a statement that returns no rows.
  void run() { (void)step(); }
  // For a statement run again with other parameters.
  void reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
    param_ = 0;
  }

  std::string text(int col) const {
    const auto* t = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
    return t ? t : "";
  }
  int64_t integer(int col) const { return sqlite3_column_int64(stmt_, col); }
  bool is_null(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }
  const void* blob(int col) const { return sqlite3_column_blob(stmt_, col); }
  size_t blob_bytes(int col) const { return static_cast<size_t>(sqlite3_column_bytes(stmt_, col)); }

 private:
  int next() { return ++param_; }
  Statement& check(int rc) {
    if (rc != SQLITE_OK) fail();
    return *this;
  }
  [[noreturn]] void fail() const {
    throw std::runtime_error("catalogue " + path_ + ": " + what_ + ": " + sqlite3_errmsg(db_));
  }

  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  const std::string& path_;
  const char* what_;
  int param_ = 0;
};

}  // namespace

MetaStore::MetaStore(const std::string& path) : path_(path) {
  if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                      nullptr) != SQLITE_OK) {
    std::string msg = db_ ? sqlite3_errmsg(db_) : "out of memory";
    sqlite3_close(db_);
    db_ = nullptr;
    throw std::runtime_error("cannot open catalogue " + path + ": " + msg);
  }
  sqlite3_busy_timeout(db_, 5000);
  // WAL + FULL: a committed transaction survives power loss.
  exec("PRAGMA journal_mode=WAL");
  exec("PRAGMA synchronous=FULL");
  exec("CREATE TABLE IF NOT EXISTS caches ("
       " name TEXT PRIMARY KEY, remote TEXT NOT NULL, cache_path TEXT NOT NULL, mode TEXT NOT NULL,"
       " size INTEGER NOT NULL, chunk_size INTEGER NOT NULL, clean INTEGER NOT NULL)");
  exec("CREATE TABLE IF NOT EXISTS bitmap_pages ("
       " name TEXT NOT NULL, kind INTEGER NOT NULL, page INTEGER NOT NULL, bits BLOB NOT NULL,"
       " PRIMARY KEY (name, kind, page)) WITHOUT ROWID");
  exec("CREATE TABLE IF NOT EXISTS cache_state ("
       " name TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (name, key)) WITHOUT ROWID");
  exec("CREATE TABLE IF NOT EXISTS access_profile ("
       " name TEXT NOT NULL, session INTEGER NOT NULL, batch INTEGER NOT NULL, chunks BLOB NOT NULL,"
       " PRIMARY KEY (name, session, batch)) WITHOUT ROWID");
}

MetaStore::~MetaStore() { sqlite3_close(db_); }

void MetaStore::exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    throw std::runtime_error("catalogue " + path_ + ": " + msg);
  }
}

// The run-time tables are created on first use (with the store's mutex
// held), so that the constructor stays as the cache knows it.
void MetaStore::create_runtime_tables() {
  exec("CREATE TABLE IF NOT EXISTS runtime_exports ("
       " name TEXT PRIMARY KEY, uri TEXT NOT NULL, options TEXT NOT NULL, added INTEGER NOT NULL)");
  exec("CREATE TABLE IF NOT EXISTS runtime_settings ("
       " name TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, config_value TEXT NOT NULL,"
       " PRIMARY KEY (name, key)) WITHOUT ROWID");
  exec("CREATE TABLE IF NOT EXISTS kernel_devices (idx INTEGER PRIMARY KEY, record TEXT NOT NULL)");
}

std::vector<std::pair<uint32_t, std::string>> MetaStore::kernel_devices() {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  std::vector<std::pair<uint32_t, std::string>> out;
  Statement st(db_, path_, "cannot read the kernel devices", "SELECT idx, record FROM kernel_devices ORDER BY idx");
  while (st.step()) out.emplace_back(static_cast<uint32_t>(st.integer(0)), st.text(1));
  return out;
}

void MetaStore::save_kernel_device(uint32_t index, const std::string& record) {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  Statement st(db_, path_, "cannot save a kernel device", "INSERT OR REPLACE INTO kernel_devices (idx, record) VALUES (?, ?)");
  st.bind(int64_t{index}).bind(record).run();
}

void MetaStore::remove_kernel_device(uint32_t index) {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  Statement st(db_, path_, "cannot forget a kernel device", "DELETE FROM kernel_devices WHERE idx = ?");
  st.bind(int64_t{index}).run();
}

std::vector<RuntimeExport> MetaStore::runtime_exports() {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  std::vector<RuntimeExport> out;
  Statement st(db_, path_, "cannot read the run-time exports",
               "SELECT name, uri, options FROM runtime_exports ORDER BY added, name");
  while (st.step()) out.push_back({st.text(0), st.text(1), st.text(2)});
  return out;
}

void MetaStore::save_runtime_export(const RuntimeExport& e) {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  Statement st(db_, path_, "cannot save export",
               "INSERT OR REPLACE INTO runtime_exports (name, uri, options, added)"
               " VALUES (?, ?, ?, (SELECT COALESCE(MAX(added), 0) + 1 FROM runtime_exports))");
  st.bind(e.name).bind(e.uri).bind(e.options).run();
}

bool MetaStore::remove_runtime_export(const std::string& name) {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  Statement st(db_, path_, "cannot remove export", "DELETE FROM runtime_exports WHERE name = ?");
  st.bind(name).run();
  return sqlite3_changes(db_) > 0;
}

bool MetaStore::update_runtime_export_options(const std::string& name, const std::string& options) {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  Statement st(db_, path_, "cannot update export options", "UPDATE runtime_exports SET options = ? WHERE name = ?");
  st.bind(options).bind(name).run();
  return sqlite3_changes(db_) > 0;
}

std::vector<RuntimeSetting> MetaStore::runtime_settings(const std::string& name) {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  std::vector<RuntimeSetting> out;
  Statement st(db_, path_, "cannot read the run-time settings",
               "SELECT key, value, config_value FROM runtime_settings WHERE name = ? ORDER BY key");
  st.bind(name);
  while (st.step()) out.push_back({st.text(0), st.text(1), st.text(2)});
  return out;
}

void MetaStore::save_runtime_setting(const std::string& name, const RuntimeSetting& r) {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  Statement st(db_, path_, "cannot save a run-time setting",
               "INSERT OR REPLACE INTO runtime_settings (name, key, value, config_value) VALUES (?, ?, ?, ?)");
  st.bind(name).bind(r.key).bind(r.value).bind(r.config_value).run();
}

void MetaStore::forget_runtime_setting(const std::string& name, const std::string& key) {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  Statement st(db_, path_, "cannot forget a run-time setting",
               "DELETE FROM runtime_settings WHERE name = ? AND key = ?");
  st.bind(name).bind(key).run();
}

size_t MetaStore::forget_runtime_settings(const std::string& name) {
  std::lock_guard lock(mutex_);
  create_runtime_tables();
  Statement st(db_, path_, "cannot forget the run-time settings", "DELETE FROM runtime_settings WHERE name = ?");
  st.bind(name).run();
  return static_cast<size_t>(sqlite3_changes(db_));
}

std::optional<CacheRecord> MetaStore::find(const std::string& name) {
  std::lock_guard lock(mutex_);
  Statement st(db_, path_, "cannot read the cache record",
               "SELECT remote, cache_path, mode, size, chunk_size, clean FROM caches WHERE name = ?");
  st.bind(name);
  if (!st.step()) return std::nullopt;
  CacheRecord r;
  r.name = name;
  r.remote = st.text(0);
  r.cache_path = st.text(1);
  r.mode = st.text(2);
  r.size = static_cast<uint64_t>(st.integer(3));
  r.chunk_size = static_cast<uint64_t>(st.integer(4));
  r.clean = st.integer(5) != 0;
  return r;
}

std::vector<std::string> MetaStore::cache_paths() {
  std::lock_guard lock(mutex_);
  Statement st(db_, path_, "cannot read the cache records", "SELECT cache_path FROM caches");
  std::vector<std::string> out;
  while (st.step()) out.push_back(st.text(0));
  return out;
}

void MetaStore::reset(const CacheRecord& r) {
  std::lock_guard lock(mutex_);
  exec("BEGIN IMMEDIATE");
  try {
    for (const char* sql : {"DELETE FROM bitmap_pages WHERE name = ?", "DELETE FROM cache_state WHERE name = ?",
                            "DELETE FROM access_profile WHERE name = ?"}) {
      Statement del(db_, path_, "cannot reset the cache", sql);
      del.bind(r.name).run();
    }
    Statement ins(db_, path_, "cannot reset the cache",
                  "INSERT OR REPLACE INTO caches (name, remote, cache_path, mode, size, chunk_size, clean)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?)");
    ins.bind(r.name).bind(r.remote).bind(r.cache_path).bind(r.mode);
    ins.bind(static_cast<int64_t>(r.size)).bind(static_cast<int64_t>(r.chunk_size)).bind(int64_t{r.clean ? 1 : 0});
    ins.run();
    exec("COMMIT");
  } catch (...) {
    sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

void MetaStore::set_clean(const std::string& name, bool clean) { commit(name, {}, clean); }

void MetaStore::set_mode(const std::string& name, const std::string& mode) {
  std::lock_guard lock(mutex_);
  Statement st(db_, path_, "cannot store the write mode", "UPDATE caches SET mode = ? WHERE name = ?");
  st.bind(mode).bind(name).run();
}

std::vector<uint64_t> MetaStore::load_bitmap(const std::string& name, BitmapKind kind, size_t nwords) {
  std::lock_guard lock(mutex_);
  std::vector<uint64_t> words(nwords, 0);
  Statement st(db_, path_, "cannot read a bitmap", "SELECT page, bits FROM bitmap_pages WHERE name = ? AND kind = ?");
  st.bind(name).bind(int64_t{static_cast<int>(kind)});
  while (st.step()) {
    const auto page = static_cast<uint64_t>(st.integer(0));
    const size_t first = page * kWordsPerPage;
    if (first >= nwords) continue;  // from a larger image: ignore
    const size_t n = std::min(st.blob_bytes(1) / 8, nwords - first);
    if (n) std::memcpy(words.data() + first, st.blob(1), n * 8);
  }
  return words;
}

void MetaStore::commit(const std::string& name, const std::vector<PageWrite>& pages, std::optional<bool> clean) {
  commit_with_size(name, pages, clean, std::nullopt);
}

void MetaStore::grow(const std::string& name, uint64_t size, const std::vector<PageWrite>& pages) {
  commit_with_size(name, pages, std::nullopt, size);
}

void MetaStore::commit_with_size(const std::string& name, const std::vector<PageWrite>& pages,
                                 std::optional<bool> clean, std::optional<uint64_t> size) {
  std::lock_guard lock(mutex_);
  exec("BEGIN IMMEDIATE");
  try {
    if (size) {
      Statement st(db_, path_, "cannot grow the cache record", "UPDATE caches SET size = ? WHERE name = ?");
      st.bind(static_cast<int64_t>(*size)).bind(name).run();
      if (sqlite3_changes(db_) != 1) throw std::runtime_error("catalogue " + path_ + ": no cache record of " + name);
    }
    if (!pages.empty()) {
      Statement st(db_, path_, "commit failed",
                   "INSERT OR REPLACE INTO bitmap_pages (name, kind, page, bits) VALUES (?, ?, ?, ?)");
      for (const auto& p : pages) {
        st.reset();
        st.bind(name).bind(int64_t{static_cast<int>(p.kind)}).bind(int64_t{p.page});
        st.bind_blob(p.words.data(), p.words.size() * 8).run();
      }
    }
    if (clean) {
      Statement st(db_, path_, "commit failed", "UPDATE caches SET clean = ? WHERE name = ?");
      st.bind(int64_t{*clean ? 1 : 0}).bind(name).run();
    }
    exec("COMMIT");
  } catch (...) {
    sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

std::optional<std::string> MetaStore::get_state(const std::string& name, const std::string& key) {
  std::lock_guard lock(mutex_);
  Statement st(db_, path_, "cannot read state", "SELECT value FROM cache_state WHERE name = ? AND key = ?");
  st.bind(name).bind(key);
  if (!st.step()) return std::nullopt;
  return st.text(0);
}

void MetaStore::set_state(const std::string& name, const std::string& key, const std::string& value) {
  std::lock_guard lock(mutex_);
  Statement st(db_, path_, "cannot store state",
               "INSERT OR REPLACE INTO cache_state (name, key, value) VALUES (?, ?, ?)");
  st.bind(name).bind(key).bind(value).run();
}

namespace {

// Runs `body` in one BEGIN IMMEDIATE ... COMMIT (rolled back if it throws).
template <class F>
void in_transaction(sqlite3* db, const std::function<void(const char*)>& exec, F&& body) {
  exec("BEGIN IMMEDIATE");
  try {
    body();
    exec("COMMIT");
  } catch (...) {
    sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

}  // namespace

void MetaStore::freeze_overlay(const std::string& name, const std::string& frozen, const std::string& new_path,
                               const std::string& chain) {
  std::lock_guard lock(mutex_);
  in_transaction(db_, [this](const char* sql) { exec(sql); }, [&] {
    const char* what = "cannot take the snapshot";
    Statement copy(db_, path_, what,
                   "INSERT OR REPLACE INTO caches (name, remote, cache_path, mode, size, chunk_size, clean)"
                   " SELECT ?, remote, cache_path, 'overlay-snapshot', size, chunk_size, 1 FROM caches WHERE name = ?");
    copy.bind(frozen).bind(name).run();
    if (sqlite3_changes(db_) != 1) throw std::runtime_error("catalogue " + path_ + ": no overlay record of " + name);
    Statement drop(db_, path_, what, "DELETE FROM bitmap_pages WHERE name = ?");
    drop.bind(frozen).run();
    Statement move(db_, path_, what, "UPDATE bitmap_pages SET name = ? WHERE name = ?");
    move.bind(frozen).bind(name).run();
    Statement point(db_, path_, what, "UPDATE caches SET cache_path = ? WHERE name = ?");
    point.bind(new_path).bind(name).run();
    Statement state(db_, path_, what,
                    "INSERT OR REPLACE INTO cache_state (name, key, value) VALUES (?, 'snapshots', ?)");
    state.bind(name).bind(chain).run();
  });
}

void MetaStore::replace_overlay(const std::string& name, const std::string& new_path) {
  std::lock_guard lock(mutex_);
  in_transaction(db_, [this](const char* sql) { exec(sql); }, [&] {
    Statement drop(db_, path_, "cannot revert", "DELETE FROM bitmap_pages WHERE name = ?");
    drop.bind(name).run();
    Statement point(db_, path_, "cannot revert", "UPDATE caches SET cache_path = ? WHERE name = ?");
    point.bind(new_path).bind(name).run();
  });
}

void MetaStore::drop_snapshot(const std::string& name, const std::string& dropped, const std::string& chain) {
  std::lock_guard lock(mutex_);
  in_transaction(db_, [this](const char* sql) { exec(sql); }, [&] {
    for (const char* sql : {"DELETE FROM bitmap_pages WHERE name = ?", "DELETE FROM cache_state WHERE name = ?",
                            "DELETE FROM caches WHERE name = ?"}) {
      Statement del(db_, path_, "cannot delete the snapshot", sql);
      del.bind(dropped).run();
    }
    Statement state(db_, path_, "cannot delete the snapshot",
                    "INSERT OR REPLACE INTO cache_state (name, key, value) VALUES (?, 'snapshots', ?)");
    state.bind(name).bind(chain).run();
  });
}

int64_t MetaStore::begin_session(const std::string& name, int keep) {
  std::lock_guard lock(mutex_);
  int64_t last = 0;
  {
    Statement st(db_, path_, "cannot read the access profile",
                 "SELECT MAX(session) FROM access_profile WHERE name = ?");
    st.bind(name);
    if (st.step() && !st.is_null(0)) last = st.integer(0);
  }
  const int64_t session = last + 1;
  // Keep the newest `keep` earlier sessions (those > session - 1 - keep).
  Statement st(db_, path_, "cannot prune the access profile",
               "DELETE FROM access_profile WHERE name = ? AND session <= ?");
  st.bind(name).bind(session - 1 - keep).run();
  return session;
}

void MetaStore::append_profile(const std::string& name, int64_t session, int64_t batch,
                               const std::vector<uint32_t>& chunks) {
  std::lock_guard lock(mutex_);
  Statement st(db_, path_, "cannot store the access profile",
               "INSERT OR REPLACE INTO access_profile (name, session, batch, chunks) VALUES (?, ?, ?, ?)");
  st.bind(name).bind(session).bind(batch).bind_blob(chunks.data(), chunks.size() * sizeof(uint32_t)).run();
}

std::vector<std::vector<uint32_t>> MetaStore::load_profiles(const std::string& name) {
  std::lock_guard lock(mutex_);
  std::vector<std::vector<uint32_t>> out;
  Statement st(db_, path_, "cannot read the access profile",
               "SELECT session, chunks FROM access_profile WHERE name = ? ORDER BY session DESC, batch");
  st.bind(name);
  int64_t current = -1;
  while (st.step()) {
    const int64_t session = st.integer(0);
    if (out.empty() || session != current) out.emplace_back();
    current = session;
    const size_t n = st.blob_bytes(1) / sizeof(uint32_t);
    const size_t old = out.back().size();
    out.back().resize(old + n);
    if (n) std::memcpy(out.back().data() + old, st.blob(1), n * sizeof(uint32_t));
  }
  return out;
}

void MetaStore::replace_profiles(const std::string& name, int64_t current,
                                 const std::vector<std::vector<uint32_t>>& older) {
  std::lock_guard lock(mutex_);
  exec("BEGIN IMMEDIATE");
  try {
    Statement del(db_, path_, "cannot replace the access profile",
                  "DELETE FROM access_profile WHERE name = ? AND session <> ?");
    del.bind(name).bind(current).run();
    Statement ins(db_, path_, "cannot store the access profile",
                  "INSERT OR REPLACE INTO access_profile (name, session, batch, chunks) VALUES (?, ?, 0, ?)");
    for (size_t i = 0; i < older.size(); ++i) {
      if (older[i].empty()) continue;
      ins.reset();
      ins.bind(name).bind(current - 1 - static_cast<int64_t>(i));
      ins.bind_blob(older[i].data(), older[i].size() * sizeof(uint32_t)).run();
    }
    exec("COMMIT");
  } catch (...) {
    sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

}  // namespace blockway::cache
