// Control plane: the JSON protocol, the dispatch table, the export commands
// against a fake ExportControl (the cache's implementation is tested in the
// cache's own tests and end to end in tests/integration/test_control.py), and
// the control socket itself.
#include "core/checked_device.hpp"
#include "gateway/config.hpp"
#include "gateway/control_protocol.hpp"
#include "gateway/control_server.hpp"
#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <gtest/gtest.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

namespace blockway::gateway {
namespace {

using core::CacheReport;
using core::Capabilities;
using core::CheckedDevice;
using core::ConfigError;
using core::ControlResult;
using core::Export;
using core::ExportControl;
using core::ExportTable;
using core::Geometry;
using core::PrefetchOrder;
using core::PrefetchState;
using core::RetryHealth;
using core::Support;
using core::Task;
using test::MemoryDevice;
using test::sync_wait;

// Records what the control plane asks and answers what the test scripts.
class FakeControl final : public ExportControl {
 public:
  CacheReport report_value;
  ControlResult next;  // returned by the next action
  std::vector<std::string> calls;
  PrefetchOrder last_order = PrefetchOrder::sequential;
  uint64_t last_rate = 0;
  bool last_force = false;
  std::string last_mode;

  CacheReport report() const override { return report_value; }
  ControlResult prefetch_start(PrefetchOrder order) override {
    calls.push_back("start");
    last_order = order;
    return next;
  }
  ControlResult prefetch_pause() override {
    calls.push_back("pause");
    return next;
  }
  ControlResult prefetch_resume() override {
    calls.push_back("resume");
    return next;
  }
  ControlResult prefetch_set_rate(uint64_t bps) override {
    calls.push_back("rate");
    last_rate = bps;
    return next;
  }
  Task<ControlResult> detach(bool force) override {
    calls.push_back("detach");
    last_force = force;
    co_return next;
  }
  Task<ControlResult> set_mode(std::string_view mode) override {
    calls.push_back("mode");
    last_mode = std::string(mode);
    co_return next;
  }
};

Capabilities writable() {
  Capabilities c;
  c.flush = Support::native;
  return c;
}

struct Fixture : ::testing::Test {
  ExportTable table;
  ControlDispatcher dispatcher;
  FakeControl fake;
  MemoryDevice* plain_mem = nullptr;

  void SetUp() override {
    auto plain = std::make_shared<Export>();
    plain->name = "plain";
    plain->uri = "file:///plain.img";
    auto mem = std::make_unique<MemoryDevice>(Geometry{.size = 1 << 20}, writable());
    plain_mem = mem.get();
    plain->device = std::make_shared<CheckedDevice>(std::move(mem), false);
    table.add(plain);

    auto cached = std::make_shared<Export>();
    cached->name = "cached";
    cached->uri = "nbd://remote/x";
    cached->device = std::make_shared<CheckedDevice>(
        std::make_unique<MemoryDevice>(Geometry{.size = 4 << 20}, writable()), true);
    cached->control = &fake;
    cached->remote_health = [] {
      RetryHealth h;
      h.connected = false;
      h.reconnects = 3;
      h.last_error = std::make_error_code(std::errc::connection_refused);
      return h;
    };
    table.add(cached);

    fake.report_value.mode = "writeback";
    fake.report_value.present_bytes = 1 << 20;
    fake.report_value.dirty_bytes = 4096;
    fake.report_value.chunk_size = 65536;
    fake.report_value.prefetch.state = PrefetchState::running;
    fake.report_value.prefetch.total_bytes = 4 << 20;
    fake.report_value.prefetch.done_bytes = 1 << 20;
    fake.report_value.prefetch.rate = 1e6;
    fake.report_value.prefetch.eta_seconds = 3;
    add_export_commands(dispatcher, table);
  }

  Json call(const std::string& line) {
    const std::string reply = sync_wait(dispatcher.handle(line));
    EXPECT_EQ(reply.find('\n'), std::string::npos) << "a response is one line";
    return Json::parse(reply);
  }
  Json call(const char* line) { return call(std::string(line)); }
  Json call(const Json& request) { return call(request.dump()); }
  static std::string code(const Json& r) { return r.at("ok") == false ? r["error"]["code"].get<std::string>() : ""; }
};

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
    add_export_commands(dispatcher, table, std::move(hooks));  // replaces the commands
  }
  Task<std::string> save(std::string name, std::string key, std::string value) {
    saved.push_back(name + " " + key + "=" + value);
    co_return save_warning;
  }
};

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

// ---- the socket ----

int connect_to(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

void send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return;  // the server may hang up mid-way (too-large)
    off += static_cast<size_t>(n);
  }
}

// Reads up to and including '\n'; "" on EOF before any byte.
std::string read_line(int fd) {
  std::string line;
  char c;
  while (::read(fd, &c, 1) == 1) {
    if (c == '\n') return line;
    line += c;
  }
  return line;
}

struct SocketFixture : Fixture {
  boost::asio::io_context ctx;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work;
  std::thread loop;
  std::string dir, path;
  std::unique_ptr<ControlServer> server;
  std::vector<std::unique_ptr<ControlServer>> more;  // stopped and destroyed after the loop ends

  void SetUp() override {
    Fixture::SetUp();
    char tmpl[] = "/tmp/blockway-control-test-XXXXXX";
    dir = ::mkdtemp(tmpl);
    path = dir + "/sub/control.sock";
    server = std::make_unique<ControlServer>(ctx, dispatcher);
    work.emplace(ctx.get_executor());
  }
  void start() {
    loop = std::thread([this] { ctx.run(); });
  }
  void TearDown() override {
    server->stop();
    for (auto& m : more) m->stop();
    work.reset();
    if (loop.joinable()) loop.join();
    server.reset();
    more.clear();
    std::filesystem::remove_all(dir);
  }
};

TEST_F(SocketFixture, SocketIsPrivateAndAnswersLines) {
  server->listen(path);
  start();
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  const int fd = connect_to(path);
  ASSERT_GE(fd, 0);
  // Two requests in one write, one with CRLF, blank lines ignored.
  send_all(fd, "{\"cmd\":\"list\"}\r\n\n{\"cmd\":\"nope\"}\n");
  EXPECT_EQ(Json::parse(read_line(fd))["ok"], true);
  EXPECT_EQ(Json::parse(read_line(fd))["error"]["code"], "unknown-command");
  // A last request without its newline is still answered.
  send_all(fd, "{\"cmd\":\"list\"}");
  ::shutdown(fd, SHUT_WR);
  EXPECT_EQ(Json::parse(read_line(fd))["ok"], true);
  EXPECT_EQ(read_line(fd), "");
  ::close(fd);
}

TEST_F(SocketFixture, HugeLineIsRefusedAndTheServerGoesOn) {
  server->listen(path);
  start();
  const int fd = connect_to(path);
  ASSERT_GE(fd, 0);
  send_all(fd, "{\"cmd\":\"" + std::string(kMaxControlRequest * 2, 'x'));
  const auto r = Json::parse(read_line(fd));
  EXPECT_EQ(r["error"]["code"], "too-large");
  EXPECT_EQ(read_line(fd), "") << "the connection is closed after a too-large line";
  ::close(fd);
  const int fd2 = connect_to(path);
  send_all(fd2, "{\"cmd\":\"status\"}\n");
  EXPECT_EQ(Json::parse(read_line(fd2))["ok"], true);
  ::close(fd2);
}

TEST_F(SocketFixture, ManyClientsAtOnce) {
  server->listen(path);
  start();
  std::vector<int> fds;
  for (int i = 0; i < 50; ++i) {
    fds.push_back(connect_to(path));
    ASSERT_GE(fds.back(), 0);
  }
  for (int fd : fds) send_all(fd, "{\"cmd\":\"status\"}\n");
  for (int fd : fds) {
    EXPECT_EQ(Json::parse(read_line(fd))["ok"], true);
    ::close(fd);
  }
}

TEST_F(SocketFixture, LiveSocketIsNeverTakenOverStaleOneIsReplaced) {
  server->listen(path);
  start();
  auto& second = *more.emplace_back(std::make_unique<ControlServer>(ctx, dispatcher));
  EXPECT_THROW(second.listen(path), std::runtime_error);
  EXPECT_TRUE(ControlServer::is_live(path));
  // A regular file is not ours to delete.
  const std::string file = dir + "/file";
  { std::ofstream(file) << "x"; }
  EXPECT_THROW(second.listen(file), std::runtime_error);
  EXPECT_TRUE(std::filesystem::exists(file));
  // A stale socket file (nobody listens) is replaced.
  const std::string stale = dir + "/stale.sock";
  {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, stale.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ::close(fd);
  }
  EXPECT_FALSE(ControlServer::is_live(stale));
  auto& third = *more.emplace_back(std::make_unique<ControlServer>(ctx, dispatcher));
  third.listen(stale, 0660);
  struct stat st {};
  ASSERT_EQ(::stat(stale.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_TRUE(ControlServer::is_live(stale));
  EXPECT_THROW(second.listen("relative.sock"), std::runtime_error);
}

// Whoever holds PATH.lock owns PATH: a second server is refused, naming the
// holder's pid, even where the socket looks stale (gone, or not answering:
// what two daemons starting at once could both see).
TEST_F(SocketFixture, OneServerPerSocketByItsLockFile) {
  server->listen(path);
  start();
  EXPECT_TRUE(std::filesystem::exists(path + ".lock"));
  const std::string refused = "another blockwayd is running on " + path + " (pid " + std::to_string(::getpid()) + ")";
  auto& second = *more.emplace_back(std::make_unique<ControlServer>(ctx, dispatcher));
  for (int round = 0; round < 2; ++round) {
    try {
      second.listen(path);
      ADD_FAILURE() << "round " << round << ": a second server listens on " << path;
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()), refused);
    }
    ::unlink(path.c_str());  // round 1: no socket at all at the path
  }
  EXPECT_TRUE(std::filesystem::exists(path + ".lock")) << "a refused server leaves the holder's lock file";
}

// A lock file planted as a hard link to another file is refused, and that
// file is neither truncated nor written (the daemon writes its pid there).
TEST_F(SocketFixture, ALockFileWithAnotherLinkIsRefusedAndLeftAlone) {
  const std::string victim = dir + "/victim";
  std::filesystem::create_directories(dir + "/sub");
  {
    std::ofstream(victim) << "precious\n";
  }
  ASSERT_EQ(::link(victim.c_str(), (path + ".lock").c_str()), 0) << std::strerror(errno);
  try {
    server->listen(path);
    ADD_FAILURE() << "listened with a hard-linked lock file";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("refusing the lock file " + path + ".lock"), std::string::npos) << e.what();
  }
  std::ifstream in(victim);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "precious\n");
  EXPECT_TRUE(std::filesystem::exists(path + ".lock")) << "the planted file is not ours to remove";
}

// The socket appears at its path complete: it is never created there and its
// mode is never changed through that path (a chmod() after bind() follows a
// symlink swapped into the directory in between), and the process umask is
// left alone (other threads create files meanwhile).
TEST_F(SocketFixture, SocketAppearsWithItsModeAndIsNeverChmodedInPlace) {
  std::filesystem::create_directories(dir + "/sub");
  const int in = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  ASSERT_GE(in, 0);
  ASSERT_GE(::inotify_add_watch(in, (dir + "/sub").c_str(), IN_CREATE | IN_ATTRIB | IN_MOVED_TO), 0);
  const mode_t umask_before = ::umask(022);
  ::umask(umask_before);
  server->listen(path, 0640);
  const mode_t umask_after = ::umask(022);
  ::umask(umask_after);
  EXPECT_EQ(umask_after, umask_before);
  start();
  std::vector<std::string> events;
  alignas(inotify_event) char buf[4096];
  for (ssize_t n; (n = ::read(in, buf, sizeof buf)) > 0;) {
    for (char* p = buf; p < buf + n;) {
      const auto* ev = reinterpret_cast<const inotify_event*>(p);
      const std::string name = ev->len ? ev->name : "";
      if (name == "control.sock") {
        if (ev->mask & IN_CREATE) events.push_back("create");
        if (ev->mask & IN_ATTRIB) events.push_back("attrib");
        if (ev->mask & IN_MOVED_TO) events.push_back("moved-to");
      }
      p += sizeof(inotify_event) + ev->len;
    }
  }
  ::close(in);
  EXPECT_EQ(events, std::vector<std::string>{"moved-to"}) << "bound elsewhere, then renamed into place";
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0640u);
  // Nothing is left of the private directory.
  for (const auto& e : std::filesystem::directory_iterator(dir + "/sub"))
    EXPECT_TRUE(e.path().filename() == "control.sock" || e.path().filename() == "control.sock.lock") << e.path();
  const int fd = connect_to(path);
  ASSERT_GE(fd, 0);
  send_all(fd, "{\"cmd\":\"list\"}\n");
  EXPECT_EQ(Json::parse(read_line(fd))["ok"], true);
  ::close(fd);
}

// A symlink at the socket's path is refused and its target left as it was.
TEST_F(SocketFixture, SymlinkAtThePathIsRefusedAndItsTargetUntouched) {
  std::filesystem::create_directories(dir + "/sub");
  const std::string victim = dir + "/victim";
  std::filesystem::create_directories(dir + "/sub");
  { std::ofstream(victim) << "x"; }
  ::chmod(victim.c_str(), 0644);
  ASSERT_EQ(::symlink(victim.c_str(), path.c_str()), 0);
  EXPECT_THROW(server->listen(path, 0666), std::runtime_error);
  struct stat st {};
  ASSERT_EQ(::stat(victim.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  for (const auto& e : std::filesystem::directory_iterator(dir + "/sub"))
    EXPECT_EQ(e.path().filename(), "control.sock") << "the private directory is removed after a failure";
}

TEST_F(SocketFixture, GroupSetsTheSocketsGroup) {
  // Root may give the socket any group; anyone may give it their own.
  const gid_t group = ::geteuid() == 0 ? 65534 : ::getegid();
  server->listen(path, 0660, group);
  start();
  struct stat st {};
  ASSERT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_gid, group);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
}

// ---- [control] in the configuration ----

DaemonConfig load(const std::string& toml) {
  char tmpl[] = "/tmp/blockway-control-conf-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(::write(fd, toml.data(), toml.size()), static_cast<ssize_t>(toml.size()));
  ::close(fd);
  DaemonConfig cfg;
  try {
    load_config_file(tmpl, cfg);
  } catch (...) {
    ::unlink(tmpl);
    throw;
  }
  ::unlink(tmpl);
  return cfg;
}

TEST(ControlConfig, SocketAndMode) {
  const auto cfg = load("[control]\nsocket = \"/run/x/c.sock\"\nmode = \"0660\"\n");
  EXPECT_EQ(cfg.control_socket, "/run/x/c.sock");
  EXPECT_EQ(cfg.control_socket_mode, 0660u);
  EXPECT_EQ(cfg.control_mode(), 0660u);
  // A group makes the default mode 0660; an explicit mode still wins.
  const auto grouped = load("[control]\ngroup = \"0\"\n");
  EXPECT_EQ(grouped.control_socket_group, "0");
  EXPECT_EQ(grouped.control_mode(), 0660u);
  EXPECT_EQ(load("[control]\ngroup = \"root\"\nmode = \"0640\"\n").control_mode(), 0640u);
  EXPECT_EQ(control_group_id("root"), 0u);
  EXPECT_EQ(control_group_id("1234"), 1234u);
  EXPECT_NO_THROW(cfg.validate());
  EXPECT_EQ(load("[control]\nmode = 0o640\n").control_socket_mode, 0640u);
  const auto off = load("[control]\nsocket = \"off\"\n");
  EXPECT_EQ(off.control_socket, "off");
  EXPECT_NO_THROW(off.validate());
  const auto dflt = load("threads = 2\n");
  EXPECT_EQ(dflt.control_socket, "");
  EXPECT_EQ(dflt.control_socket_mode, 0600u);
}

TEST(ControlConfig, MistakesNameTheSetting) {
  auto message = [](const std::string& toml) {
    try {
      load(toml).validate();
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message("[control]\nbogus = 1\n").find("control.bogus"), std::string::npos);
  EXPECT_NE(message("[control]\nmode = \"rw\"\n").find("control.mode"), std::string::npos);
  EXPECT_NE(message("[control]\nmode = \"01777\"\n").find("control.mode"), std::string::npos);
  EXPECT_NE(message("[control]\nsocket = \"\"\n").find("off"), std::string::npos);
  EXPECT_NE(message("[control]\nsocket = \"relative.sock\"\n").find("absolute"), std::string::npos);
  EXPECT_NE(message("control = 1\n").find("[control]"), std::string::npos);
  EXPECT_NE(message("[control]\ngroup = \"no-such-group-here\"\n").find("control.group"), std::string::npos);
  EXPECT_NE(message("[control]\ngroup = \"\"\n").find("control.group"), std::string::npos);
}

}  // namespace
}  // namespace blockway::gateway
