// RetryLayer over a scripted fake remote: retries after connection errors,
// bounded waits, one reconnect at a time, and honest flushes after a
// reconnect.
#include "core/options.hpp"
#include "core/retry_layer.hpp"
#include "tests/support/test_util.hpp"

#include <gtest/gtest.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <optional>
#include <thread>
#include <vector>

namespace blockway::core {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::sync_wait;

constexpr uint64_t kSize = 1 << 20;

Task<void> sleep_for(std::chrono::milliseconds d) {
  const auto ex = co_await boost::asio::this_coro::executor;
  boost::asio::steady_timer t(ex, d);
  co_await t.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
}

// A remote whose session can be broken on cue. Every data operation first
// runs `enter()`, which applies the script.
class ScriptedRemote final : public RemoteDevice {
 public:
  // --- script (set from the test thread before or while running) ---
  std::atomic<int> fail_next{0};        // the next N operations fail with fail_errno
  std::atomic<int> fail_errno{ECONNRESET};
  std::atomic<bool> down{false};        // operations: ENOTCONN; reconnect: ECONNREFUSED
  std::atomic<int> hang_next{0};        // the next N operations hang, then ETIMEDOUT
  std::chrono::milliseconds hang_for{200};
  std::chrono::milliseconds reconnect_delay{0};
  // --- observations ---
  std::atomic<int> calls{0};
  std::atomic<int> reconnect_calls{0};
  std::atomic<int> reconnects_ok{0};
  std::atomic<int> concurrent_reconnects{0};
  std::atomic<int> max_concurrent_reconnects{0};

  Geometry geometry() const noexcept override { return Geometry{kSize, 512, 4096, 1 << 20}; }
  Capabilities capabilities() const noexcept override {
    Capabilities c;
    c.flush = Support::native;
    c.fua = Support::native;
    c.zero = Support::native;
    c.trim = Support::native;
    return c;
  }
  std::string describe() const override { return "scripted"; }

  Task<std::error_code> read(std::span<std::byte> buf, uint64_t, IoFlags) override {
    auto ec = co_await enter();
    if (!ec) std::fill(buf.begin(), buf.end(), std::byte{0x5a});
    co_return ec;
  }
  Task<std::error_code> write(std::span<const std::byte>, uint64_t, IoFlags) override { return enter(); }
  Task<std::error_code> flush() override { return enter(); }
  Task<std::error_code> trim(ByteRange, IoFlags) override { return enter(); }
  Task<std::error_code> zero(ByteRange, IoFlags) override { return enter(); }
  Task<std::error_code> block_status(ByteRange range, ExtentList& out) override {
    out.push_back({range.length / 2, 0});  // a partial answer, then maybe a failure
    auto ec = co_await enter();
    co_return ec;
  }
  Task<std::error_code> prefetch(ByteRange) override { return enter(); }

  Task<std::error_code> reconnect() override {
    ++reconnect_calls;
    const int now = ++concurrent_reconnects;
    int seen = max_concurrent_reconnects.load();
    while (now > seen && !max_concurrent_reconnects.compare_exchange_weak(seen, now)) {
    }
    if (reconnect_delay.count() > 0) co_await sleep_for(reconnect_delay);
    --concurrent_reconnects;
    if (down) co_return errno_code(ECONNREFUSED);
    connected_ = true;
    ++generation_;
    ++reconnects_ok;
    co_return std::error_code{};
  }
  bool connected() const noexcept override { return connected_; }
  uint64_t generation() const noexcept override { return generation_; }

 private:
  Task<std::error_code> enter() {
    ++calls;
    if (hang_next > 0) {
      --hang_next;
      co_await sleep_for(hang_for);  // the backend's io-timeout fired
      connected_ = false;
      co_return errno_code(ETIMEDOUT);
    }
    if (down || !connected_) {
      connected_ = false;
      co_return errno_code(ENOTCONN);
    }
    if (fail_next > 0) {
      --fail_next;
      const int e = fail_errno;
      if (is_connection_error(errno_code(e))) connected_ = false;
      co_return errno_code(e);
    }
    co_return std::error_code{};
  }

  std::atomic<bool> connected_{true};
  std::atomic<uint64_t> generation_{1};
};

RetryOptions fast_options(std::chrono::milliseconds timeout) {
  RetryOptions o;
  o.timeout = timeout;
  o.first_backoff = 20ms;
  o.max_backoff = 200ms;
  o.poll = 2ms;
  return o;
}

struct Fixture {
  explicit Fixture(std::chrono::milliseconds timeout = 2000ms) {
    auto r = std::make_unique<ScriptedRemote>();
    remote = r.get();
    layer = std::make_unique<RetryLayer>(std::move(r), fast_options(timeout));
  }
  ScriptedRemote* remote;
  std::unique_ptr<RetryLayer> layer;
  std::vector<std::byte> buf = std::vector<std::byte>(4096);

  std::error_code read() { return sync_wait(layer->read(buf, 0, 0)); }
  std::error_code write(IoFlags flags = 0) { return sync_wait(layer->write(buf, 0, flags)); }
  std::error_code flush() { return sync_wait(layer->flush()); }
};

std::error_code err(int e) { return errno_code(e); }

TEST(RetryLayerTest, PassesThroughWhenHealthy) {
  Fixture f;
  EXPECT_FALSE(f.read());
  EXPECT_EQ(f.buf[0], std::byte{0x5a});
  EXPECT_FALSE(f.write());
  EXPECT_FALSE(f.flush());
  EXPECT_EQ(f.remote->reconnect_calls, 0);
  const auto h = f.layer->health();
  EXPECT_TRUE(h.connected);
  EXPECT_EQ(h.retries, 0u);
}

TEST(RetryLayerTest, RetriesAfterConnectionResetsThenSucceeds) {
  Fixture f;
  f.remote->fail_next = 3;
  EXPECT_FALSE(f.read());
  EXPECT_EQ(f.buf[0], std::byte{0x5a});
  EXPECT_EQ(f.remote->calls, 4);
  EXPECT_EQ(f.remote->reconnects_ok, 3);
  const auto h = f.layer->health();
  EXPECT_EQ(h.retries, 3u);
  EXPECT_EQ(h.reconnects, 3u);
  EXPECT_EQ(h.last_error, err(ECONNRESET));
  EXPECT_EQ(h.generation, 4u);
  EXPECT_TRUE(h.connected);
}

TEST(RetryLayerTest, OtherErrorsAreNotRetried) {
  Fixture f;
  f.remote->fail_errno = EIO;
  f.remote->fail_next = 1;
  EXPECT_EQ(f.read(), err(EIO));
  f.remote->fail_errno = ENOSPC;
  f.remote->fail_next = 1;
  EXPECT_EQ(f.write(), err(ENOSPC));
  EXPECT_EQ(f.remote->reconnect_calls, 0);
  EXPECT_EQ(f.remote->calls, 2);
}

TEST(RetryLayerTest, RemoteDownPastTheDeadlineFailsWithEioInTime) {
  Fixture f(300ms);
  f.remote->down = true;
  const auto start = Clock::now();
  EXPECT_EQ(f.read(), err(EIO));
  const auto took = Clock::now() - start;
  EXPECT_GE(took, 300ms);
  EXPECT_LT(took, 1500ms);
  EXPECT_GE(f.remote->reconnect_calls, 2);  // back-off: several attempts, not one per poll
  EXPECT_LT(f.remote->reconnect_calls, 20);
  const auto h = f.layer->health();
  EXPECT_FALSE(h.connected);
  EXPECT_EQ(h.failures, 1u);
  EXPECT_EQ(h.last_error, err(ECONNREFUSED));
  // Once the remote is back, the next request works.
  f.remote->down = false;
  EXPECT_FALSE(f.read());
}

TEST(RetryLayerTest, HungRequestTimesOutAndIsRetried) {
  Fixture f;
  f.remote->hang_next = 1;
  f.remote->hang_for = 150ms;
  const auto start = Clock::now();
  EXPECT_FALSE(f.read());
  EXPECT_GE(Clock::now() - start, 150ms);
  EXPECT_EQ(f.remote->reconnects_ok, 1);
  EXPECT_EQ(f.layer->health().last_error, err(ETIMEDOUT));
}

TEST(RetryLayerTest, HungReconnectDoesNotHoldRequestsPastTheirDeadline) {
  Fixture f(200ms);
  f.remote->down = true;
  f.remote->reconnect_delay = 1500ms;
  boost::asio::io_context io;
  std::error_code result;
  Clock::duration took{};
  boost::asio::co_spawn(
      io,
      [&]() -> Task<void> {
        const auto start = Clock::now();
        result = co_await f.layer->read(f.buf, 0, 0);
        took = Clock::now() - start;
      },
      [](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);
      });
  io.run();  // also waits for the detached reconnect attempt to end
  EXPECT_EQ(result, err(EIO));
  EXPECT_LT(took, 800ms);
}

TEST(RetryLayerTest, ConcurrentFailuresShareOneReconnect) {
  Fixture f(3000ms);
  f.remote->down = true;
  boost::asio::io_context io;
  std::atomic<int> ok{0};
  std::vector<std::vector<std::byte>> bufs(16, std::vector<std::byte>(512));
  for (auto& b : bufs) {
    boost::asio::co_spawn(
        io,
        [&f, &ok, &b]() -> Task<void> {
          if (!co_await f.layer->read(b, 0, 0)) ++ok;
        },
        [](std::exception_ptr e) {
          if (e) std::rethrow_exception(e);
        });
  }
  std::jthread restore([&] {
    std::this_thread::sleep_for(250ms);
    f.remote->down = false;
  });
  io.run();
  EXPECT_EQ(ok, 16);
  EXPECT_EQ(f.remote->reconnects_ok, 1);
  EXPECT_EQ(f.remote->max_concurrent_reconnects, 1);
  EXPECT_EQ(f.layer->health().reconnects, 1u);
}

// Runs one request on `io` as the nbdkit plugin does: only until it is done.
std::error_code run_until_done(boost::asio::io_context& io, Task<std::error_code> task) {
  const auto work = boost::asio::make_work_guard(io);  // before restart(): see PluginStack::run()
  io.restart();
  std::optional<std::error_code> result;
  boost::asio::co_spawn(io, std::move(task), [&](std::exception_ptr e, std::error_code ec) {
    if (e) std::rethrow_exception(e);
    result = ec;
  });
  while (!result) io.run_one();
  return *result;
}

TEST(RetryLayerTest, TheReconnectLoopRunsWhereReconnectOnSaysNotOnACallerThatStopsRunning) {
  Fixture f(300ms);
  boost::asio::io_context loop;
  auto loop_work = boost::asio::make_work_guard(loop);
  std::jthread loop_thread([&] { loop.run(); });
  f.layer->reconnect_on(loop.get_executor());
  f.remote->down = true;
  // The first request starts the reconnect loop and gives up; its thread
  // never runs its io_context again (an nbdkit worker that went idle).
  boost::asio::io_context first;
  EXPECT_EQ(run_until_done(first, f.layer->read(f.buf, 0, 0)), err(EIO));
  // Once the remote is back, a request from another thread gets a session:
  // the loop it started ended on `loop` (nobody waited), so this one starts
  // a new one. Had the loop stayed on `first`, it would never end, and this
  // request would wait for it until its deadline and fail with EIO.
  f.remote->down = false;
  boost::asio::io_context second;
  EXPECT_FALSE(run_until_done(second, f.layer->read(f.buf, 0, 0)));
  EXPECT_EQ(f.remote->reconnects_ok, 1);
  loop_work.reset();
}

TEST(RetryLayerTest, FlushAfterReconnectReportsPossiblyLostWritesOnce) {
  Fixture f;
  EXPECT_FALSE(f.write());  // acknowledged on generation 1, never flushed there
  f.remote->fail_next = 1;  // the session dies under the flush
  const auto ec = f.flush();
  EXPECT_EQ(ec, core::writes_lost_error());  // a cache above can tell it apart...
  EXPECT_EQ(ec, std::errc::io_error);            // ...and to everyone else it is EIO
  EXPECT_EQ(ec.value(), EIO);
  EXPECT_EQ(f.remote->reconnects_ok, 1);
  EXPECT_FALSE(f.flush());  // reported once; later flushes are honest again
  EXPECT_FALSE(f.write());
  EXPECT_FALSE(f.flush());
}

TEST(RetryLayerTest, WritesLostBetweenFlushesAreReportedByTheNextFlush) {
  Fixture f;
  EXPECT_FALSE(f.write());
  f.remote->fail_next = 1;  // a read meets the broken session and reconnects
  EXPECT_FALSE(f.read());
  EXPECT_FALSE(f.write());  // on the new session
  EXPECT_EQ(f.flush(), core::writes_lost_error());
  EXPECT_FALSE(f.flush());
}

TEST(RetryLayerTest, FlushedOrFuaWritesSurviveAReconnect) {
  Fixture f;
  EXPECT_FALSE(f.write());
  EXPECT_FALSE(f.flush());  // covered on its own session
  EXPECT_FALSE(f.write(kFua));  // durable on acknowledgement
  EXPECT_FALSE(sync_wait(f.layer->trim({0, 4096}, 0)));  // advisory
  f.remote->fail_next = 1;
  EXPECT_FALSE(f.read());
  EXPECT_EQ(f.remote->reconnects_ok, 1);
  EXPECT_FALSE(f.flush());
}

TEST(RetryLayerTest, UnflushedZeroesCountAsWrites) {
  Fixture f;
  EXPECT_FALSE(sync_wait(f.layer->zero({0, 4096}, 0)));
  f.remote->fail_next = 1;
  EXPECT_EQ(f.flush(), core::writes_lost_error());
}

TEST(RetryLayerTest, BlockStatusRetryDropsPartialAnswers) {
  Fixture f;
  f.remote->fail_next = 1;
  ExtentList out{{7, 0}};  // earlier content stays
  EXPECT_FALSE(sync_wait(f.layer->block_status({0, 8192}, out)));
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0], (Extent{7, 0}));
  EXPECT_EQ(out[1], (Extent{4096, 0}));
}

TEST(RetryLayerTest, ZeroTimeoutFailsAtOnce) {
  Fixture f(0ms);
  f.remote->fail_next = 1;
  EXPECT_EQ(f.read(), err(EIO));
  EXPECT_EQ(f.remote->calls, 1);
}

TEST(RetryOptionsTest, ParsesAndConsumesRetryTimeout) {
  std::map<std::string, std::string> values{{"retry-timeout", "2.5"}, {"other", "x"}};
  Options opts(values);
  const auto o = RetryOptions::take_from(opts);
  EXPECT_EQ(o.timeout, 2500ms);
  EXPECT_FALSE(values.contains("retry-timeout"));
  EXPECT_TRUE(values.contains("other"));

  std::map<std::string, std::string> none;
  Options no_opts(none);
  EXPECT_EQ(RetryOptions::take_from(no_opts).timeout, 30000ms);

  for (const char* bad : {"abc", "-1", "5s", "", "1e9"}) {
    std::map<std::string, std::string> v2{{"retry-timeout", bad}};
    Options o2(v2);
    EXPECT_THROW(RetryOptions::take_from(o2), ConfigError) << bad;
  }
}

}  // namespace
}  // namespace blockway::core
