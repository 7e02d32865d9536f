// The fixture the control plane's unit tests share: an export table with a
// plain export and one with a cache under run-time control (a FakeControl
// that records what it is asked and answers what the test scripts), and the
// export commands on a dispatcher.
#pragma once

#include "core/checked_device.hpp"
#include "gateway/control_protocol.hpp"
#include "tests/support/memory_device.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

namespace blockway::gateway::test_support {

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

inline Capabilities writable() {
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

}  // namespace blockway::gateway::test_support
