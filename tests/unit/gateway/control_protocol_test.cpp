// The control protocol: the JSON lines, the dispatch table and the export
// commands, against a fake ExportControl (the cache's implementation is
// tested in the cache's own tests and end to end in
// tests/integration/test_control.py).
#include "gateway/control_protocol.hpp"

#include "tests/unit/gateway/control_fixture.hpp"

#include <gtest/gtest.h>

namespace blockway::gateway {
namespace {

using namespace test_support;

TEST_F(Fixture, MalformedRequestsGetClearErrors) {
  EXPECT_EQ(code(call("{not json")), "bad-request");
  EXPECT_EQ(code(call("")), "bad-request");
  EXPECT_EQ(code(call("[1,2]")), "bad-request");
  EXPECT_EQ(code(call("\"status\"")), "bad-request");
  EXPECT_EQ(code(call(R"({"name": "plain"})")), "bad-request");
  EXPECT_EQ(code(call(R"({"cmd": 5})")), "bad-request");
  EXPECT_EQ(code(call(std::string("{\"cmd\":\"st\xff\xfe\"}"))), "bad-request");  // invalid UTF-8
  const auto r = call(R"({"cmd": "reboot", "id": 7})");
  EXPECT_EQ(code(r), "unknown-command");
  EXPECT_EQ(r["error"]["errno"], ENOSYS);
  EXPECT_NE(r["error"]["message"].get<std::string>().find("reboot"), std::string::npos);
  EXPECT_EQ(r["id"], 7);
  EXPECT_EQ(code(call(std::string(kMaxControlRequest + 1, ' '))), "too-large");
}

// Copying or dumping a deeply nested json value recurses: such a request
// must be refused before it is parsed, not crash the daemon.
TEST_F(Fixture, DeeplyNestedRequestsAreRefused) {
  const size_t levels = 30000;  // fits in one request line
  std::string deep = R"({"cmd":"status","id":)" + std::string(levels, '[') + std::string(levels, ']') + "}";
  ASSERT_LE(deep.size(), kMaxControlRequest);
  const auto r = call(deep);
  EXPECT_EQ(code(r), "bad-request");
  EXPECT_NE(r["error"]["message"].get<std::string>().find("nests deeper"), std::string::npos);
  // Brackets inside strings do not count; nesting up to the limit is fine.
  EXPECT_EQ(call(R"({"cmd":"status","id":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["})")["ok"], true);
  std::string ok_deep = R"({"cmd":"status","id":)" + std::string(kMaxControlDepth - 1, '[') +
                        std::string(kMaxControlDepth - 1, ']') + "}";
  EXPECT_EQ(call(ok_deep)["ok"], true);
}

TEST_F(Fixture, ArgumentsAreTypeChecked) {
  EXPECT_EQ(code(call(R"({"cmd": "stats"})")), "bad-request");
  EXPECT_EQ(code(call(R"({"cmd": "stats", "name": 3})")), "bad-request");
  EXPECT_EQ(code(call(R"({"cmd": "stats", "name": "nope"})")), "unknown-export");
  EXPECT_EQ(code(call(R"({"cmd": "stats", "name": ""})")), "unknown-export");
  EXPECT_EQ(code(call(R"({"cmd": "detach", "name": "cached", "force": "yes"})")), "bad-request");
  EXPECT_EQ(code(call(R"({"cmd": "prefetch-rate", "name": "cached"})")), "bad-request");
  EXPECT_EQ(code(call(R"({"cmd": "prefetch-rate", "name": "cached", "rate": -1})")), "bad-request");
  EXPECT_EQ(code(call(R"({"cmd": "prefetch-rate", "name": "cached", "rate": "fast"})")), "bad-request");
  EXPECT_EQ(code(call(R"({"cmd": "prefetch-rate", "name": "cached", "rate": 1.5})")), "bad-request");
  EXPECT_EQ(code(call(R"({"cmd": "prefetch-start", "name": "cached", "order": "random"})")), "bad-request");
  EXPECT_EQ(code(call(R"({"cmd": "mode", "name": "cached", "mode": "local"})")), "bad-request");
  EXPECT_TRUE(fake.calls.empty()) << "nothing reaches the export on a bad request";
}

TEST_F(Fixture, StatusReportsEveryExport) {
  const auto r = call(R"({"cmd": "status", "id": "abc"})");
  ASSERT_EQ(r["ok"], true) << r.dump();
  EXPECT_EQ(r["id"], "abc");
  const auto& list = r["result"]["exports"];
  ASSERT_EQ(list.size(), 2u);
  const auto& cached = list[0];  // sorted by name
  EXPECT_EQ(cached["name"], "cached");
  EXPECT_EQ(cached["mode"], "writeback");
  EXPECT_EQ(cached["size"], 4 << 20);
  EXPECT_EQ(cached["read_only"], true);
  EXPECT_EQ(cached["present_bytes"], 1 << 20);
  EXPECT_EQ(cached["dirty_bytes"], 4096);
  EXPECT_EQ(cached["cache"]["chunk_size"], 65536);
  EXPECT_EQ(cached["prefetch"]["state"], "running");
  EXPECT_DOUBLE_EQ(cached["prefetch"]["percent"].get<double>(), 25.0);
  EXPECT_DOUBLE_EQ(cached["prefetch"]["eta_seconds"].get<double>(), 3.0);
  EXPECT_EQ(cached["remote"]["kind"], "network");
  EXPECT_EQ(cached["remote"]["connected"], false);
  EXPECT_EQ(cached["remote"]["reconnects"], 3);
  EXPECT_TRUE(cached["remote"].contains("last_error"));
  EXPECT_EQ(cached["clients"], 0);
  const auto& plain = list[1];
  EXPECT_EQ(plain["mode"], "direct");
  EXPECT_TRUE(plain["cache"].is_null());
  EXPECT_TRUE(plain["prefetch"].is_null());
  EXPECT_EQ(plain["remote"]["kind"], "local");
}

TEST_F(Fixture, CountersAreLive) {
  std::vector<std::byte> buf(4096);
  auto plain = table.find("plain");
  ASSERT_FALSE(sync_wait(plain->device->read(buf, 0, 0)));
  ASSERT_FALSE(sync_wait(plain->device->write(buf, 8192, 0)));
  const auto r = call(R"({"cmd": "stats", "name": "plain"})");
  ASSERT_EQ(r["ok"], true) << r.dump();
  EXPECT_EQ(r["result"]["io"]["reads"], 1);
  EXPECT_EQ(r["result"]["io"]["bytes_written"], 4096);
}

TEST_F(Fixture, ClientsAreCounted) {
  table.find("plain")->clients += 2;  // what two NBD sessions do
  auto not_a_client = table.find("plain");  // a reference alone (a FUSE node) is not a client
  const auto r = call(R"({"cmd": "list"})");
  ASSERT_EQ(r["ok"], true);
  for (const auto& e : r["result"]["exports"])
    EXPECT_EQ(e["clients"], e["name"] == "plain" ? 2 : 0) << e.dump();
}

TEST_F(Fixture, CacheCommandsNeedACache) {
  for (const char* cmd : {"prefetch-start", "prefetch-pause", "prefetch-resume", "prefetch-status", "detach"}) {
    const auto r = call(Json{{"cmd", cmd}, {"name", "plain"}});
    EXPECT_EQ(code(r), "no-cache") << cmd;
    EXPECT_NE(r["error"]["message"].get<std::string>().find("plain"), std::string::npos);
  }
  EXPECT_EQ(code(call(R"({"cmd": "mode", "name": "plain", "mode": "writeback"})")), "no-cache");
  EXPECT_EQ(code(call(R"({"cmd": "prefetch-rate", "name": "plain", "rate": 1})")), "no-cache");
}

TEST_F(Fixture, PrefetchCommandsReachTheExport) {
  ASSERT_EQ(call(R"({"cmd": "prefetch-start", "name": "cached"})")["ok"], true);
  EXPECT_EQ(fake.last_order, PrefetchOrder::sequential);
  ASSERT_EQ(call(R"({"cmd": "prefetch-start", "name": "cached", "order": "hot-first"})")["ok"], true);
  EXPECT_EQ(fake.last_order, PrefetchOrder::hot_first);
  ASSERT_EQ(call(R"({"cmd": "prefetch-pause", "name": "cached"})")["ok"], true);
  ASSERT_EQ(call(R"({"cmd": "prefetch-resume", "name": "cached"})")["ok"], true);
  ASSERT_EQ(call(R"({"cmd": "prefetch-rate", "name": "cached", "rate": "50M"})")["ok"], true);
  EXPECT_EQ(fake.last_rate, 50ull << 20);
  ASSERT_EQ(call(R"({"cmd": "prefetch-rate", "name": "cached", "rate": 0})")["ok"], true);
  EXPECT_EQ(fake.last_rate, 0u);
  EXPECT_EQ(fake.calls, (std::vector<std::string>{"start", "start", "pause", "resume", "rate", "rate"}));
  const auto s = call(R"({"cmd": "prefetch-status", "name": "cached"})");
  ASSERT_EQ(s["ok"], true);
  EXPECT_EQ(s["result"]["state"], "running");
  EXPECT_EQ(s["result"]["done_bytes"], 1 << 20);
  EXPECT_EQ(s["result"]["size"], 4 << 20);

  fake.next = {std::make_error_code(std::errc::operation_in_progress), ""};
  fake.next.ec = std::error_code(EALREADY, std::system_category());
  const auto again = call(R"({"cmd": "prefetch-start", "name": "cached"})");
  EXPECT_EQ(code(again), "refused");
  EXPECT_EQ(again["error"]["errno"], EALREADY);
}

TEST_F(Fixture, DetachRefusalCarriesTheExportsMessage) {
  fake.next = {std::error_code(EBUSY, std::system_category()), "12 chunks (768 KiB) are not present yet"};
  const auto r = call(R"({"cmd": "detach", "name": "cached", "force": true})");
  EXPECT_EQ(code(r), "refused");
  EXPECT_EQ(r["error"]["errno"], EBUSY);
  EXPECT_NE(r["error"]["message"].get<std::string>().find("12 chunks (768 KiB) are not present yet"),
            std::string::npos);
  EXPECT_TRUE(fake.last_force);
  fake.next = {};
  EXPECT_EQ(call(R"({"cmd": "detach", "name": "cached"})")["ok"], true);
  EXPECT_FALSE(fake.last_force);
  fake.next = {std::error_code(EIO, std::system_category()), "cannot write the catalogue"};
  EXPECT_EQ(code(call(R"({"cmd": "detach", "name": "cached"})")), "failed");
}

TEST_F(Fixture, ModeChange) {
  ASSERT_EQ(call(R"({"cmd": "mode", "name": "cached", "mode": "writethrough"})")["ok"], true);
  EXPECT_EQ(fake.last_mode, "writethrough");
  fake.next = {std::error_code(EPERM, std::system_category()), "the export is detached"};
  const auto r = call(R"({"cmd": "mode", "name": "cached", "mode": "writeback"})");
  EXPECT_EQ(code(r), "refused");
  EXPECT_NE(r["error"]["message"].get<std::string>().find("detached"), std::string::npos);
}

// The daemon's hooks: run-time changes the export took are handed on to be
// saved (refusals are not); saved exports that failed to open are listed.
struct HookedFixture : Fixture {
  std::vector<std::string> saved;
  std::string save_warning;
  Json failed = Json::array();

  void SetUp() override {
    Fixture::SetUp();
    ExportCommandHooks hooks;
    hooks.persist = [this](std::shared_ptr<Export> exp, std::string key, std::string value) {
      return save(exp->name, std::move(key), std::move(value));
    };
    hooks.failed_exports = [this] { return failed; };
    hooks.fuse_mount = [] { return ExportCommandHooks::FuseMount{.mountpoint = "/mnt", .uid = 7, .gid = 8, .mode = 0644}; };
    hooks.forget_file = [this](std::shared_ptr<Export> exp) { return forget(exp->name); };
    add_export_commands(dispatcher, table, std::move(hooks));  // replaces the commands
  }
  Task<std::string> save(std::string name, std::string key, std::string value) {
    saved.push_back(name + " " + key + "=" + value);
    co_return save_warning;
  }
  std::vector<std::string> forgotten;
  Task<void> forget(std::string name) {
    forgotten.push_back(std::move(name));
    co_return;
  }
};

// access with fuse_uid/fuse_gid/fuse_mode: the export's file attributes
// change (only those given; "" = the mount's), the FUSE mount is told before
// the answer, the change is saved; a bad value changes and saves nothing.
TEST_F(HookedFixture, FuseOwnerAndModeChangeAtRunTime) {
  const auto plain = table.find("plain");
  auto r = call(R"({"cmd": "access", "name": "plain"})");
  ASSERT_EQ(r["ok"], true) << r.dump();
  EXPECT_EQ(r["result"]["fuse_uid"], nullptr);
  EXPECT_EQ(r["result"]["fuse"], Json({{"mountpoint", "/mnt"}, {"uid", 7}, {"gid", 8}, {"mode", "0644"}}));
  EXPECT_TRUE(saved.empty() && forgotten.empty()) << "a report changes nothing";

  r = call(R"({"cmd": "access", "name": "plain", "fuse_uid": "64131", "fuse_mode": "600"})");
  ASSERT_EQ(r["ok"], true) << r.dump();
  EXPECT_EQ(plain->file(), (core::FileAttrs{.uid = 64131, .mode = 0600}));
  EXPECT_EQ(r["result"]["fuse_uid"], 64131);
  EXPECT_EQ(r["result"]["fuse_gid"], nullptr);
  EXPECT_EQ(r["result"]["fuse_mode"], "0600");
  EXPECT_EQ(r["result"]["fuse"], Json({{"mountpoint", "/mnt"}, {"uid", 64131}, {"gid", 8}, {"mode", "0600"}}));
  EXPECT_EQ(saved, (std::vector<std::string>{"plain fuse=fuse-uid=64131,fuse-gid=,fuse-mode=0600"}));
  EXPECT_EQ(forgotten, (std::vector<std::string>{"plain"}));

  // Only what is given changes; "" is the mount's again.
  ASSERT_EQ(call(R"({"cmd": "access", "name": "plain", "fuse_gid": "root", "fuse_uid": ""})")["ok"], true);
  EXPECT_EQ(plain->file(), (core::FileAttrs{.gid = 0, .mode = 0600}));
  EXPECT_EQ(saved.back(), "plain fuse=fuse-uid=,fuse-gid=0,fuse-mode=0600");
  ASSERT_EQ(call(R"({"cmd": "access", "name": "plain", "fuse_gid": "", "fuse_mode": ""})")["ok"], true);
  EXPECT_EQ(plain->file_attrs.load(), nullptr) << "nothing set: the mount's for all";

  // Bad values: the configuration's messages, nothing changed or saved.
  const size_t saves = saved.size();
  r = call(R"({"cmd": "access", "name": "plain", "fuse_uid": "64131", "fuse_mode": "0800"})");
  EXPECT_EQ(code(r), "bad-request");
  EXPECT_NE(r["error"]["message"].get<std::string>().find("export 'plain': option fuse-mode"), std::string::npos)
      << r.dump();
  r = call(R"({"cmd": "access", "name": "plain", "fuse_gid": "no-such-group"})");
  EXPECT_EQ(r["error"]["message"], "export 'plain': option fuse-gid='no-such-group': no such group");
  EXPECT_EQ(code(call(R"({"cmd": "access", "name": "plain", "fuse_uid": 5})")), "bad-request");
  EXPECT_EQ(plain->file_attrs.load(), nullptr);
  EXPECT_EQ(saved.size(), saves);

  // A read-only export's file shows at most 0444.
  r = call(R"({"cmd": "access", "name": "cached", "fuse_mode": "0660"})");
  ASSERT_EQ(r["ok"], true) << r.dump();
  EXPECT_EQ(r["result"]["fuse"]["mode"], "0440");
}

TEST_F(HookedFixture, ModeAndRateChangesAreSavedRefusalsAreNot) {
  ASSERT_EQ(call(R"({"cmd": "mode", "name": "cached", "mode": "writeback-local"})")["ok"], true);
  ASSERT_EQ(call(R"({"cmd": "prefetch-rate", "name": "cached", "rate": "2M"})")["ok"], true);
  EXPECT_EQ(saved, (std::vector<std::string>{"cached mode=writeback-local", "cached prefetch-rate=2097152"}));
  fake.next = {std::error_code(EPERM, std::system_category()), "the export is detached"};
  EXPECT_EQ(code(call(R"({"cmd": "mode", "name": "cached", "mode": "writeback"})")), "refused");
  EXPECT_EQ(code(call(R"({"cmd": "mode", "name": "cached", "mode": "bogus"})")), "bad-request");
  EXPECT_EQ(saved.size(), 2u) << "nothing saved for a change that did not happen";
  // A change that could not be saved is in effect, with a warning.
  fake.next = {};
  save_warning = "disk full";
  const auto r = call(R"({"cmd": "mode", "name": "cached", "mode": "writethrough"})");
  ASSERT_EQ(r["ok"], true);
  EXPECT_EQ(r["result"]["warning"], "disk full");
  EXPECT_NE(r["result"]["message"].get<std::string>().find("warning: disk full"), std::string::npos);
}

TEST_F(HookedFixture, FailedSavedExportsShowInStatusListAndStatsAndAreRefusedElsewhere) {
  failed.push_back({{"name", "gone"}, {"uri", "file:///gone.img"}, {"options", ""},
                    {"state", "failed: no such file"}, {"error", "no such file"}, {"mode", "failed"},
                    {"clients", 0}});
  const auto status = call(R"({"cmd": "status"})")["result"]["exports"];
  ASSERT_EQ(status.size(), 3u);
  EXPECT_EQ(status[0]["state"], "open");
  EXPECT_EQ(status[2]["name"], "gone");
  EXPECT_EQ(status[2]["state"], "failed: no such file");
  const auto list = call(R"({"cmd": "list"})")["result"]["exports"];
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[0]["state"], "open");
  EXPECT_EQ(list[2]["state"], "failed: no such file");
  const auto stats = call(R"({"cmd": "stats", "name": "gone"})");
  ASSERT_EQ(stats["ok"], true);
  EXPECT_EQ(stats["result"]["state"], "failed: no such file");
  const auto r = call(R"({"cmd": "detach", "name": "gone"})");
  EXPECT_EQ(code(r), "refused");
  EXPECT_NE(r["error"]["message"].get<std::string>().find("failed: no such file"), std::string::npos);
  EXPECT_EQ(code(call(R"({"cmd": "stats", "name": "nowhere"})")), "unknown-export");
}

TEST_F(Fixture, Flush) {
  ASSERT_EQ(call(R"({"cmd": "flush", "name": "plain"})")["ok"], true);
  EXPECT_EQ(plain_mem->calls(test::Op::flush), 1u);
  plain_mem->fail(test::Op::flush, EIO);
  const auto r = call(R"({"cmd": "flush", "name": "plain"})");
  EXPECT_EQ(code(r), "failed");
  EXPECT_EQ(r["error"]["errno"], EIO);
  // A read-only export has nothing to flush: success, with a note.
  const auto ro = call(R"({"cmd": "flush", "name": "cached"})");
  EXPECT_EQ(ro["ok"], true);
}

Task<Json> throws_anything(const Json&) {
  throw std::runtime_error("boom");
  co_return Json{};
}
Task<Json> echo(const Json& req) { co_return req; }

TEST_F(Fixture, NewCommandIsOneEntryAndExceptionsNeverEscape) {
  dispatcher.add("boom", "throws", throws_anything);
  dispatcher.add("echo", "echoes", echo);
  const auto b = call(R"({"cmd": "boom"})");
  EXPECT_EQ(code(b), "failed");
  EXPECT_EQ(b["error"]["message"], "boom");
  EXPECT_EQ(call(R"({"cmd": "echo", "x": 1})")["result"]["x"], 1);
  const auto list = call(R"({"cmd": "commands"})");
  EXPECT_TRUE(list["result"].contains("echo"));
  EXPECT_TRUE(list["result"].contains("status"));
}

}  // namespace
}  // namespace blockway::gateway
