#include "cache/meta_store.hpp"

#include <sqlite3.h>

#include <cstring>
#include <memory>
#include <stdexcept>

namespace blockway::cache {
namespace {

struct StmtDeleter {
  void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
};
using Stmt = std::unique_ptr<sqlite3_stmt, StmtDeleter>;

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

// The run-time exports table is created on first use (with the store's
// mutex held), so that the constructor stays as the cache knows it.
static void create_runtime_exports_table(sqlite3* db) {
  char* err = nullptr;
  if (sqlite3_exec(db,
                   "CREATE TABLE IF NOT EXISTS runtime_exports ("
                   " name TEXT PRIMARY KEY, uri TEXT NOT NULL, options TEXT NOT NULL, added INTEGER NOT NULL)",
                   nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    throw std::runtime_error("catalogue: cannot create the runtime_exports table: " + msg);
  }
}

std::vector<RuntimeExport> MetaStore::runtime_exports() {
  std::lock_guard lock(mutex_);
  create_runtime_exports_table(db_);
  std::vector<RuntimeExport> out;
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "SELECT name, uri, options FROM runtime_exports ORDER BY added, name", -1, &raw, nullptr);
  Stmt st(raw);
  while (sqlite3_step(raw) == SQLITE_ROW) {
    RuntimeExport e;
    e.name = reinterpret_cast<const char*>(sqlite3_column_text(raw, 0));
    e.uri = reinterpret_cast<const char*>(sqlite3_column_text(raw, 1));
    e.options = reinterpret_cast<const char*>(sqlite3_column_text(raw, 2));
    out.push_back(std::move(e));
  }
  return out;
}

void MetaStore::save_runtime_export(const RuntimeExport& e) {
  std::lock_guard lock(mutex_);
  create_runtime_exports_table(db_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_,
                     "INSERT OR REPLACE INTO runtime_exports (name, uri, options, added)"
                     " VALUES (?, ?, ?, (SELECT COALESCE(MAX(added), 0) + 1 FROM runtime_exports))",
                     -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, e.name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 2, e.uri.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 3, e.options.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(raw) != SQLITE_DONE)
    throw std::runtime_error("catalogue " + path_ + ": cannot save export: " + sqlite3_errmsg(db_));
}

bool MetaStore::remove_runtime_export(const std::string& name) {
  std::lock_guard lock(mutex_);
  create_runtime_exports_table(db_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "DELETE FROM runtime_exports WHERE name = ?", -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(raw) != SQLITE_DONE)
    throw std::runtime_error("catalogue " + path_ + ": cannot remove export: " + sqlite3_errmsg(db_));
  return sqlite3_changes(db_) > 0;
}

bool MetaStore::update_runtime_export_options(const std::string& name, const std::string& options) {
  std::lock_guard lock(mutex_);
  create_runtime_exports_table(db_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "UPDATE runtime_exports SET options = ? WHERE name = ?", -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, options.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 2, name.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(raw) != SQLITE_DONE)
    throw std::runtime_error("catalogue " + path_ + ": cannot update export options: " + sqlite3_errmsg(db_));
  return sqlite3_changes(db_) > 0;
}

// Created on first use, like runtime_exports.
static void create_runtime_settings_table(sqlite3* db) {
  char* err = nullptr;
  if (sqlite3_exec(db,
                   "CREATE TABLE IF NOT EXISTS runtime_settings ("
                   " name TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, config_value TEXT NOT NULL,"
                   " PRIMARY KEY (name, key)) WITHOUT ROWID",
                   nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    throw std::runtime_error("catalogue: cannot create the runtime_settings table: " + msg);
  }
}

std::vector<RuntimeSetting> MetaStore::runtime_settings(const std::string& name) {
  std::lock_guard lock(mutex_);
  create_runtime_settings_table(db_);
  std::vector<RuntimeSetting> out;
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "SELECT key, value, config_value FROM runtime_settings WHERE name = ? ORDER BY key", -1,
                     &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  while (sqlite3_step(raw) == SQLITE_ROW) {
    RuntimeSetting r;
    r.key = reinterpret_cast<const char*>(sqlite3_column_text(raw, 0));
    r.value = reinterpret_cast<const char*>(sqlite3_column_text(raw, 1));
    r.config_value = reinterpret_cast<const char*>(sqlite3_column_text(raw, 2));
    out.push_back(std::move(r));
  }
  return out;
}

void MetaStore::save_runtime_setting(const std::string& name, const RuntimeSetting& r) {
  std::lock_guard lock(mutex_);
  create_runtime_settings_table(db_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_,
                     "INSERT OR REPLACE INTO runtime_settings (name, key, value, config_value) VALUES (?, ?, ?, ?)",
                     -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 2, r.key.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 3, r.value.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 4, r.config_value.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(raw) != SQLITE_DONE)
    throw std::runtime_error("catalogue " + path_ + ": cannot save a run-time setting: " + sqlite3_errmsg(db_));
}

void MetaStore::forget_runtime_setting(const std::string& name, const std::string& key) {
  std::lock_guard lock(mutex_);
  create_runtime_settings_table(db_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "DELETE FROM runtime_settings WHERE name = ? AND key = ?", -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 2, key.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(raw) != SQLITE_DONE)
    throw std::runtime_error("catalogue " + path_ + ": cannot forget a run-time setting: " + sqlite3_errmsg(db_));
}

std::optional<CacheRecord> MetaStore::find(const std::string& name) {
  std::lock_guard lock(mutex_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "SELECT remote, cache_path, mode, size, chunk_size, clean FROM caches WHERE name = ?",
                     -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(raw) != SQLITE_ROW) return std::nullopt;
  CacheRecord r;
  r.name = name;
  r.remote = reinterpret_cast<const char*>(sqlite3_column_text(raw, 0));
  r.cache_path = reinterpret_cast<const char*>(sqlite3_column_text(raw, 1));
  r.mode = reinterpret_cast<const char*>(sqlite3_column_text(raw, 2));
  r.size = static_cast<uint64_t>(sqlite3_column_int64(raw, 3));
  r.chunk_size = static_cast<uint64_t>(sqlite3_column_int64(raw, 4));
  r.clean = sqlite3_column_int(raw, 5) != 0;
  return r;
}

void MetaStore::reset(const CacheRecord& r) {
  std::lock_guard lock(mutex_);
  exec("BEGIN IMMEDIATE");
  try {
    sqlite3_stmt* raw = nullptr;
    sqlite3_prepare_v2(db_, "DELETE FROM bitmap_pages WHERE name = ?", -1, &raw, nullptr);
    Stmt del(raw);
    sqlite3_bind_text(raw, 1, r.name.c_str(), -1, SQLITE_TRANSIENT);
    if (sqlite3_step(raw) != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db_));
    for (const char* sql : {"DELETE FROM cache_state WHERE name = ?", "DELETE FROM access_profile WHERE name = ?"}) {
      sqlite3_stmt* d = nullptr;
      sqlite3_prepare_v2(db_, sql, -1, &d, nullptr);
      Stmt st(d);
      sqlite3_bind_text(d, 1, r.name.c_str(), -1, SQLITE_TRANSIENT);
      if (sqlite3_step(d) != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db_));
    }
    sqlite3_prepare_v2(db_,
                       "INSERT OR REPLACE INTO caches (name, remote, cache_path, mode, size, chunk_size, clean)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       -1, &raw, nullptr);
    Stmt ins(raw);
    sqlite3_bind_text(raw, 1, r.name.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(raw, 2, r.remote.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(raw, 3, r.cache_path.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(raw, 4, r.mode.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(raw, 5, static_cast<sqlite3_int64>(r.size));
    sqlite3_bind_int64(raw, 6, static_cast<sqlite3_int64>(r.chunk_size));
    sqlite3_bind_int(raw, 7, r.clean ? 1 : 0);
    if (sqlite3_step(raw) != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db_));
    exec("COMMIT");
  } catch (...) {
    sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
}

void MetaStore::set_clean(const std::string& name, bool clean) { commit(name, {}, clean); }

void MetaStore::set_mode(const std::string& name, const std::string& mode) {
  std::lock_guard lock(mutex_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "UPDATE caches SET mode = ? WHERE name = ?", -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, mode.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 2, name.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(raw) != SQLITE_DONE) throw std::runtime_error(std::string("catalogue: ") + sqlite3_errmsg(db_));
}

std::vector<uint64_t> MetaStore::load_bitmap(const std::string& name, BitmapKind kind, size_t nwords) {
  std::lock_guard lock(mutex_);
  std::vector<uint64_t> words(nwords, 0);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "SELECT page, bits FROM bitmap_pages WHERE name = ? AND kind = ?", -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int(raw, 2, static_cast<int>(kind));
  while (sqlite3_step(raw) == SQLITE_ROW) {
    const auto page = static_cast<uint64_t>(sqlite3_column_int64(raw, 0));
    const auto* blob = static_cast<const std::byte*>(sqlite3_column_blob(raw, 1));
    const size_t bytes = static_cast<size_t>(sqlite3_column_bytes(raw, 1));
    const size_t first = page * kWordsPerPage;
    if (first >= nwords) continue;  // from a larger image: ignore
    const size_t n = std::min(bytes / 8, nwords - first);
    std::memcpy(words.data() + first, blob, n * 8);
  }
  return words;
}

void MetaStore::commit(const std::string& name, const std::vector<PageWrite>& pages, std::optional<bool> clean) {
  std::lock_guard lock(mutex_);
  exec("BEGIN IMMEDIATE");
  try {
    if (!pages.empty()) {
      sqlite3_stmt* raw = nullptr;
      sqlite3_prepare_v2(db_, "INSERT OR REPLACE INTO bitmap_pages (name, kind, page, bits) VALUES (?, ?, ?, ?)",
                         -1, &raw, nullptr);
      Stmt st(raw);
      for (const auto& p : pages) {
        sqlite3_reset(raw);
        sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
        sqlite3_bind_int(raw, 2, static_cast<int>(p.kind));
        sqlite3_bind_int64(raw, 3, p.page);
        sqlite3_bind_blob(raw, 4, p.words.data(), static_cast<int>(p.words.size() * 8), SQLITE_STATIC);
        if (sqlite3_step(raw) != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db_));
      }
    }
    if (clean) {
      sqlite3_stmt* raw = nullptr;
      sqlite3_prepare_v2(db_, "UPDATE caches SET clean = ? WHERE name = ?", -1, &raw, nullptr);
      Stmt st(raw);
      sqlite3_bind_int(raw, 1, *clean ? 1 : 0);
      sqlite3_bind_text(raw, 2, name.c_str(), -1, SQLITE_TRANSIENT);
      if (sqlite3_step(raw) != SQLITE_DONE) throw std::runtime_error(sqlite3_errmsg(db_));
    }
    exec("COMMIT");
  } catch (const std::exception& e) {
    sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    throw std::runtime_error("catalogue " + path_ + ": commit failed: " + e.what());
  }
}

std::optional<std::string> MetaStore::get_state(const std::string& name, const std::string& key) {
  std::lock_guard lock(mutex_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "SELECT value FROM cache_state WHERE name = ? AND key = ?", -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 2, key.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(raw) != SQLITE_ROW) return std::nullopt;
  return std::string(reinterpret_cast<const char*>(sqlite3_column_text(raw, 0)));
}

void MetaStore::set_state(const std::string& name, const std::string& key, const std::string& value) {
  std::lock_guard lock(mutex_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "INSERT OR REPLACE INTO cache_state (name, key, value) VALUES (?, ?, ?)", -1, &raw,
                     nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 2, key.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(raw, 3, value.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(raw) != SQLITE_DONE)
    throw std::runtime_error("catalogue " + path_ + ": cannot store state: " + sqlite3_errmsg(db_));
}

int64_t MetaStore::begin_session(const std::string& name, int keep) {
  std::lock_guard lock(mutex_);
  int64_t last = 0;
  {
    sqlite3_stmt* raw = nullptr;
    sqlite3_prepare_v2(db_, "SELECT MAX(session) FROM access_profile WHERE name = ?", -1, &raw, nullptr);
    Stmt st(raw);
    sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
    if (sqlite3_step(raw) == SQLITE_ROW && sqlite3_column_type(raw, 0) != SQLITE_NULL)
      last = sqlite3_column_int64(raw, 0);
  }
  const int64_t session = last + 1;
  // Keep the newest `keep` earlier sessions (those > session - 1 - keep).
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "DELETE FROM access_profile WHERE name = ? AND session <= ?", -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(raw, 2, session - 1 - keep);
  if (sqlite3_step(raw) != SQLITE_DONE)
    throw std::runtime_error("catalogue " + path_ + ": cannot prune the access profile: " + sqlite3_errmsg(db_));
  return session;
}

void MetaStore::append_profile(const std::string& name, int64_t session, int64_t batch,
                               const std::vector<uint32_t>& chunks) {
  std::lock_guard lock(mutex_);
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "INSERT OR REPLACE INTO access_profile (name, session, batch, chunks) VALUES (?, ?, ?, ?)",
                     -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(raw, 2, session);
  sqlite3_bind_int64(raw, 3, batch);
  sqlite3_bind_blob(raw, 4, chunks.data(), static_cast<int>(chunks.size() * sizeof(uint32_t)), SQLITE_STATIC);
  if (sqlite3_step(raw) != SQLITE_DONE)
    throw std::runtime_error("catalogue " + path_ + ": cannot store the access profile: " + sqlite3_errmsg(db_));
}

std::vector<std::vector<uint32_t>> MetaStore::load_profiles(const std::string& name) {
  std::lock_guard lock(mutex_);
  std::vector<std::vector<uint32_t>> out;
  sqlite3_stmt* raw = nullptr;
  sqlite3_prepare_v2(db_, "SELECT session, chunks FROM access_profile WHERE name = ? ORDER BY session DESC, batch",
                     -1, &raw, nullptr);
  Stmt st(raw);
  sqlite3_bind_text(raw, 1, name.c_str(), -1, SQLITE_TRANSIENT);
  int64_t current = -1;
  while (sqlite3_step(raw) == SQLITE_ROW) {
    const int64_t session = sqlite3_column_int64(raw, 0);
    if (out.empty() || session != current) out.emplace_back();
    current = session;
    const auto* blob = static_cast<const std::byte*>(sqlite3_column_blob(raw, 1));
    const size_t n = static_cast<size_t>(sqlite3_column_bytes(raw, 1)) / sizeof(uint32_t);
    const size_t old = out.back().size();
    out.back().resize(old + n);
    if (n) std::memcpy(out.back().data() + old, blob, n * sizeof(uint32_t));
  }
  return out;
}

}  // namespace blockway::cache
