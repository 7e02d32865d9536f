// Unit tests for cache/meta_store: the SQLite catalogue of caches.
#include "cache/meta_store.hpp"

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <filesystem>
#include <random>
#include <stdexcept>

namespace blockway::cache {
namespace {

class MetaStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("bw-meta-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "catalogue.db").string();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static CacheRecord record(const std::string& name = "vm1") {
    return {name, "file:///remote.img", "/cache/" + name + ".img", "writeback", 1u << 30, 64u << 10, false};
  }
  static std::vector<uint64_t> words(size_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<uint64_t> w(n);
    for (auto& x : w) x = rng();
    return w;
  }

  std::filesystem::path dir_;
  std::string path_;
};

TEST_F(MetaStoreTest, FindOfUnknownExportIsEmpty) {
  MetaStore s(path_);
  EXPECT_FALSE(s.find("nope").has_value());
  EXPECT_EQ(s.load_bitmap("nope", BitmapKind::present, 3), std::vector<uint64_t>(3, 0));
}

TEST_F(MetaStoreTest, ResetStoresTheRecord) {
  MetaStore s(path_);
  s.reset(record());
  auto r = s.find("vm1");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->name, "vm1");
  EXPECT_EQ(r->remote, "file:///remote.img");
  EXPECT_EQ(r->cache_path, "/cache/vm1.img");
  EXPECT_EQ(r->mode, "writeback");
  EXPECT_EQ(r->size, 1u << 30);
  EXPECT_EQ(r->chunk_size, 64u << 10);
  EXPECT_FALSE(r->clean);
}

TEST_F(MetaStoreTest, GrowChangesTheSizeAndPagesTogetherAndKeepsTheRest) {
  MetaStore s(path_);
  s.reset(record());
  const size_t n = MetaStore::kWordsPerPage + 3;  // a short last page, as a smaller image left it
  const auto dirty = words(n, 4);
  s.commit("vm1", {{BitmapKind::dirty, 0, std::vector<uint64_t>(dirty.begin(), dirty.begin() + 512)},
                   {BitmapKind::dirty, 1, std::vector<uint64_t>(dirty.begin() + 512, dirty.end())}},
           std::nullopt);
  s.set_state("vm1", "prefetch", "sequential");
  s.grow("vm1", 2u << 30, {{BitmapKind::present, 0, std::vector<uint64_t>(512, 1)}});
  auto r = s.find("vm1");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->size, 2u << 30);
  EXPECT_FALSE(r->clean);
  EXPECT_EQ(r->mode, "writeback");
  // The old bits stay where they were; the new words read as zero.
  auto loaded = s.load_bitmap("vm1", BitmapKind::dirty, 2 * n);
  EXPECT_EQ(std::vector<uint64_t>(loaded.begin(), loaded.begin() + static_cast<long>(n)), dirty);
  EXPECT_EQ(std::vector<uint64_t>(loaded.begin() + static_cast<long>(n), loaded.end()), std::vector<uint64_t>(n, 0));
  EXPECT_EQ(s.load_bitmap("vm1", BitmapKind::present, 512), std::vector<uint64_t>(512, 1));
  EXPECT_EQ(s.get_state("vm1", "prefetch"), "sequential");
  // No record, no grow.
  EXPECT_THROW(s.grow("nope", 1, {}), std::runtime_error);
  EXPECT_FALSE(s.find("nope").has_value());
}

TEST_F(MetaStoreTest, CommitAndLoadPagesOfEveryKind) {
  MetaStore s(path_);
  s.reset(record());
  const size_t n = MetaStore::kWordsPerPage * 2 + 7;  // two full pages and a short last one
  const auto present = words(n, 1), dirty = words(n, 2), intent = words(n, 3);
  std::vector<MetaStore::PageWrite> pages;
  for (auto [kind, w] : {std::pair{BitmapKind::present, &present}, std::pair{BitmapKind::dirty, &dirty},
                         std::pair{BitmapKind::intent, &intent}})
    for (size_t first = 0; first < n; first += MetaStore::kWordsPerPage) {
      const size_t len = std::min(MetaStore::kWordsPerPage, n - first);
      pages.push_back({kind, static_cast<uint32_t>(first / MetaStore::kWordsPerPage),
                       std::vector<uint64_t>(w->begin() + static_cast<long>(first),
                                             w->begin() + static_cast<long>(first + len))});
    }
  s.commit("vm1", pages, std::nullopt);
  EXPECT_EQ(s.load_bitmap("vm1", BitmapKind::present, n), present);
  EXPECT_EQ(s.load_bitmap("vm1", BitmapKind::dirty, n), dirty);
  EXPECT_EQ(s.load_bitmap("vm1", BitmapKind::intent, n), intent);
  // Other exports do not see them.
  EXPECT_EQ(s.load_bitmap("vm2", BitmapKind::present, 4), std::vector<uint64_t>(4, 0));
}

TEST_F(MetaStoreTest, MissingPagesReadAsZeroAndLargerStoredBitmapsAreCut) {
  MetaStore s(path_);
  s.reset(record());
  std::vector<uint64_t> page1(MetaStore::kWordsPerPage, ~uint64_t{0});
  s.commit("vm1", {{BitmapKind::dirty, 1, page1}}, std::nullopt);
  auto w = s.load_bitmap("vm1", BitmapKind::dirty, MetaStore::kWordsPerPage * 3);
  for (size_t i = 0; i < w.size(); ++i)
    EXPECT_EQ(w[i], (i >= MetaStore::kWordsPerPage && i < 2 * MetaStore::kWordsPerPage) ? ~uint64_t{0} : 0u) << i;
  // A smaller image: only the words that fit.
  auto small = s.load_bitmap("vm1", BitmapKind::dirty, MetaStore::kWordsPerPage + 3);
  EXPECT_EQ(small.size(), MetaStore::kWordsPerPage + 3);
  EXPECT_EQ(small.back(), ~uint64_t{0});
  auto tiny = s.load_bitmap("vm1", BitmapKind::dirty, 5);
  EXPECT_EQ(tiny, std::vector<uint64_t>(5, 0));
}

TEST_F(MetaStoreTest, CommitReplacesAPage) {
  MetaStore s(path_);
  s.reset(record());
  s.commit("vm1", {{BitmapKind::present, 0, {1, 2, 3}}}, std::nullopt);
  s.commit("vm1", {{BitmapKind::present, 0, {4, 5, 6}}}, std::nullopt);
  EXPECT_EQ(s.load_bitmap("vm1", BitmapKind::present, 3), (std::vector<uint64_t>{4, 5, 6}));
}

TEST_F(MetaStoreTest, CleanFlagAndMode) {
  MetaStore s(path_);
  s.reset(record());
  s.set_clean("vm1", true);
  EXPECT_TRUE(s.find("vm1")->clean);
  s.commit("vm1", {{BitmapKind::dirty, 0, {9}}}, false);
  EXPECT_FALSE(s.find("vm1")->clean);
  EXPECT_EQ(s.load_bitmap("vm1", BitmapKind::dirty, 1), std::vector<uint64_t>{9});
  s.set_mode("vm1", "writeback-local");
  EXPECT_EQ(s.find("vm1")->mode, "writeback-local");
}

TEST_F(MetaStoreTest, ResetForgetsBitmaps) {
  MetaStore s(path_);
  s.reset(record());
  s.commit("vm1", {{BitmapKind::dirty, 0, {7, 7}}}, std::nullopt);
  auto r = record();
  r.chunk_size = 4096;
  s.reset(r);
  EXPECT_EQ(s.find("vm1")->chunk_size, 4096u);
  EXPECT_EQ(s.load_bitmap("vm1", BitmapKind::dirty, 2), std::vector<uint64_t>(2, 0));
}

TEST_F(MetaStoreTest, ReopenPersistsEverything) {
  const auto bits = words(MetaStore::kWordsPerPage + 1, 42);
  {
    MetaStore s(path_);
    s.reset(record("a"));
    s.reset(record("b"));
    s.commit("a", {{BitmapKind::present, 0, std::vector<uint64_t>(bits.begin(), bits.begin() + 512)},
                   {BitmapKind::present, 1, std::vector<uint64_t>(bits.begin() + 512, bits.end())}},
             true);
    s.set_mode("b", "writethrough");
  }
  MetaStore s(path_);
  auto a = s.find("a");
  ASSERT_TRUE(a);
  EXPECT_TRUE(a->clean);
  EXPECT_EQ(s.load_bitmap("a", BitmapKind::present, bits.size()), bits);
  auto b = s.find("b");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->mode, "writethrough");
  EXPECT_FALSE(b->clean);
}

TEST_F(MetaStoreTest, TwoStoresOnOneFileSeeEachOthersCommits) {
  MetaStore s1(path_);
  s1.reset(record());
  MetaStore s2(path_);
  s1.commit("vm1", {{BitmapKind::intent, 0, {5}}}, std::nullopt);
  EXPECT_EQ(s2.load_bitmap("vm1", BitmapKind::intent, 1), std::vector<uint64_t>{5});
}

TEST_F(MetaStoreTest, UnopenablePathThrowsNamingIt) {
  const std::string bad = (dir_ / "missing-dir" / "x.db").string();
  try {
    MetaStore s(bad);
    FAIL() << "expected an exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
  }
}

TEST_F(MetaStoreTest, StateIsPerExportAndResetForgetsIt) {
  MetaStore s(path_);
  s.reset(record("a"));
  s.reset(record("b"));
  EXPECT_FALSE(s.get_state("a", "detached"));
  s.set_state("a", "detached", "1");
  s.set_state("a", "prefetch", "sequential");
  s.set_state("a", "prefetch", "done");
  EXPECT_EQ(s.get_state("a", "detached"), "1");
  EXPECT_EQ(s.get_state("a", "prefetch"), "done");
  EXPECT_FALSE(s.get_state("b", "detached"));
  {
    MetaStore again(path_);  // persisted
    EXPECT_EQ(again.get_state("a", "detached"), "1");
  }
  s.reset(record("a"));
  EXPECT_FALSE(s.get_state("a", "detached"));
}

TEST_F(MetaStoreTest, RuntimeSettingsAndExportOptionsPersistAndSurviveACacheReset) {
  MetaStore s(path_);
  s.reset(record("a"));
  EXPECT_TRUE(s.runtime_settings("a").empty());
  s.save_runtime_setting("a", {"mode", "writeback", "writethrough"});
  s.save_runtime_setting("a", {"prefetch-rate", "1048576", "0"});
  s.save_runtime_setting("a", {"mode", "writeback-local", "writethrough"});  // replaces
  s.reset(record("a"));  // a fresh cache keeps the operator's settings
  {
    MetaStore again(path_);
    const auto got = again.runtime_settings("a");
    ASSERT_EQ(got.size(), 2u);
    EXPECT_EQ(got[0].key, "mode");
    EXPECT_EQ(got[0].value, "writeback-local");
    EXPECT_EQ(got[0].config_value, "writethrough");
    EXPECT_EQ(got[1].key, "prefetch-rate");
    EXPECT_EQ(got[1].value, "1048576");
  }
  EXPECT_TRUE(s.runtime_settings("b").empty());
  s.forget_runtime_setting("a", "mode");
  ASSERT_EQ(s.runtime_settings("a").size(), 1u);

  s.save_runtime_export({"x", "file:///x.img", "cache=/c"});
  s.save_runtime_export({"y", "file:///y.img", ""});
  EXPECT_TRUE(s.update_runtime_export_options("x", "cache=/c,mode=writeback"));
  EXPECT_FALSE(s.update_runtime_export_options("z", "ro"));
  const auto list = s.runtime_exports();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "x") << "the order of addition is kept";
  EXPECT_EQ(list[0].options, "cache=/c,mode=writeback");
}

TEST_F(MetaStoreTest, AccessProfilesKeepOrderAndOnlyTheNewestSessions) {
  MetaStore s(path_);
  s.reset(record("a"));
  EXPECT_TRUE(s.load_profiles("a").empty());
  const int64_t s1 = s.begin_session("a");
  s.append_profile("a", s1, 0, {5, 3});
  s.append_profile("a", s1, 1, {9});
  const int64_t s2 = s.begin_session("a");
  EXPECT_GT(s2, s1);
  s.append_profile("a", s2, 0, {7, 1});
  auto p = s.load_profiles("a");
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0], (std::vector<uint32_t>{7, 1}));  // newest first
  EXPECT_EQ(p[1], (std::vector<uint32_t>{5, 3, 9}));
  for (int i = 0; i < 10; ++i) s.append_profile("a", s.begin_session("a", 2), 0, {static_cast<uint32_t>(i)});
  p = s.load_profiles("a");
  ASSERT_EQ(p.size(), 3u);  // the two kept before the newest, and the newest
  EXPECT_EQ(p[0], (std::vector<uint32_t>{9}));
  s.reset(record("a"));
  EXPECT_TRUE(s.load_profiles("a").empty());
}

// profile import: the running session stays (newest), the imported ones
// replace every earlier session just below it, newest first; the next start's
// session comes after all of them and keeps them; an empty import forgets.
TEST_F(MetaStoreTest, ReplacedProfilesSitBelowTheRunningSession) {
  MetaStore s(path_);
  s.reset(record("a"));
  s.append_profile("a", s.begin_session("a"), 0, {1, 2});
  const int64_t running = s.begin_session("a");
  s.append_profile("a", running, 0, {8});
  s.replace_profiles("a", running, {{4, 5, 6}, {7}, {}});
  auto p = s.load_profiles("a");
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(p[0], (std::vector<uint32_t>{8}));
  EXPECT_EQ(p[1], (std::vector<uint32_t>{4, 5, 6}));
  EXPECT_EQ(p[2], (std::vector<uint32_t>{7}));
  const int64_t next = s.begin_session("a");
  EXPECT_GT(next, running);
  s.append_profile("a", next, 0, {3});
  p = s.load_profiles("a");
  ASSERT_EQ(p.size(), 4u);
  EXPECT_EQ(p[0], (std::vector<uint32_t>{3}));
  EXPECT_EQ(p[2], (std::vector<uint32_t>{4, 5, 6}));
  s.replace_profiles("a", next + 1, {});
  EXPECT_TRUE(s.load_profiles("a").empty());
}

// A run-time table of another schema (an older or newer daemon's, a hand
// edit) makes every statement on it fail to prepare: that is an error naming
// the catalogue and the column, never an empty list read as "nothing saved".
TEST_F(MetaStoreTest, AStatementThatCannotBePreparedIsAClearError) {
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db,
                           "CREATE TABLE runtime_settings (name TEXT, key TEXT, value TEXT);"
                           "INSERT INTO runtime_settings VALUES ('a', 'mode', 'writeback');"
                           "CREATE TABLE runtime_exports (name TEXT, uri TEXT);"
                           "INSERT INTO runtime_exports VALUES ('x', 'file:///x.img')",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(db);
  }
  MetaStore s(path_);
  auto expect_error = [&](auto&& fn, const std::string& what, const std::string& column) {
    try {
      fn();
      ADD_FAILURE() << what << ": no error";
    } catch (const std::runtime_error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path_), std::string::npos) << msg;
      EXPECT_NE(msg.find(what), std::string::npos) << msg;
      EXPECT_NE(msg.find(column), std::string::npos) << msg;
    }
  };
  expect_error([&] { (void)s.runtime_settings("a"); }, "cannot read the run-time settings", "config_value");
  expect_error([&] { s.save_runtime_setting("a", {"mode", "writeback", "writethrough"}); },
               "cannot save a run-time setting", "config_value");
  expect_error([&] { (void)s.runtime_exports(); }, "cannot read the run-time exports", "options");
  expect_error([&] { s.save_runtime_export({"y", "file:///y.img", ""}); }, "cannot save export", "options");
  // The tables this store made itself still work.
  s.reset(record("a"));
  EXPECT_EQ(s.find("a")->mode, "writeback");
}

TEST_F(MetaStoreTest, ForgetRuntimeSettingsDropsEveryKeyOfOneExport) {
  MetaStore s(path_);
  s.save_runtime_setting("a", {"mode", "writeback", "writethrough"});
  s.save_runtime_setting("a", {"prefetch-rate", "1048576", "0"});
  s.save_runtime_setting("b", {"mode", "writeback", "writethrough"});
  EXPECT_EQ(s.forget_runtime_settings("a"), 2u);
  EXPECT_TRUE(s.runtime_settings("a").empty());
  EXPECT_EQ(s.runtime_settings("b").size(), 1u);
  EXPECT_EQ(s.forget_runtime_settings("a"), 0u);
}

}  // namespace
}  // namespace blockway::cache

namespace blockway::cache {
namespace {

TEST_F(MetaStoreTest, KernelDevicesAreKeptByIndexAndSurviveAReopen) {
  {
    MetaStore s(path_);
    EXPECT_TRUE(s.kernel_devices().empty());
    s.save_kernel_device(3, R"({"export":"b"})");
    s.save_kernel_device(0, R"({"export":"a"})");
    s.save_kernel_device(3, R"({"export":"c"})");  // replaces
  }
  MetaStore s(path_);
  const auto devices = s.kernel_devices();
  ASSERT_EQ(devices.size(), 2u);
  EXPECT_EQ(devices[0], (std::pair<uint32_t, std::string>{0, R"({"export":"a"})"}));
  EXPECT_EQ(devices[1], (std::pair<uint32_t, std::string>{3, R"({"export":"c"})"}));
  s.remove_kernel_device(0);
  s.remove_kernel_device(9);  // absent: nothing happens
  ASSERT_EQ(s.kernel_devices().size(), 1u);
  EXPECT_EQ(s.kernel_devices()[0].first, 3u);
}

}  // namespace
}  // namespace blockway::cache
