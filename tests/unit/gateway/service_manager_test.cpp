// ServiceManager: READY=1 and STATUS= to a real datagram socket, and the
// watchdog: pings while every event loop ticks, none while one loop is
// wedged, pings again once it runs.
#include "gateway/service_manager.hpp"

#include "tests/support/notify_receiver.hpp"

#include <gtest/gtest.h>

#include <boost/asio/post.hpp>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

namespace blockway::gateway {
namespace {

using namespace std::chrono_literals;

TEST(ServiceManagerTest, ReadyStatusAndAWedgedLoopStopsThePings) {
  test::NotifyReceiver r("service-test");
  ASSERT_TRUE(r.bound());
  ::setenv("NOTIFY_SOCKET", r.notify_socket().c_str(), 1);
  // Pings every 100 ms; a loop silent for 200 ms stops them. Counts below
  // leave room for a loaded machine (about 10 pings a second are sent).
  ::setenv("WATCHDOG_USEC", "400000", 1);
  ::unsetenv("WATCHDOG_PID");
  core::EventLoops loops(2, 1);
  core::ExportTable exports;
  ServiceManager service(loops, exports, [] { return size_t{3}; });
  ASSERT_TRUE(service.enabled());
  EXPECT_EQ(service.status(), "serving 0 exports to 3 clients");
  service.starting("opening exports");
  EXPECT_EQ(r.receive(5000), "STATUS=opening exports");

  std::thread runner([&] { loops.run(); });
  service.ready();
  EXPECT_EQ(r.receive(5000), "READY=1\nSTATUS=serving 0 exports to 3 clients");
  EXPECT_GE(r.pings(1000ms), 3);

  // Loop 1 blocks: within half the interval (200 ms) the pings stop.
  std::atomic<bool> release{false};
  boost::asio::post(loops.at(1), [&] {
    while (!release) std::this_thread::sleep_for(5ms);
  });
  std::this_thread::sleep_for(350ms);
  r.drain();
  EXPECT_EQ(r.pings(500ms), 0) << "a wedged loop must stop the watchdog";
  release = true;
  EXPECT_GE(r.pings(1000ms), 3) << "pings resume once the loop runs again";

  service.stopping();
  std::string stopping;
  for (int i = 0; i < 50 && !stopping.starts_with("STOPPING"); ++i) stopping = r.receive(1000);
  EXPECT_EQ(stopping, "STOPPING=1\nSTATUS=stopping: 3 clients left");
  boost::asio::post(loops.at(0), [&] {
    service.stop();
    loops.release();
  });
  runner.join();  // stop() ends every timer, so the loops run out of work
  r.drain();
  EXPECT_EQ(r.pings(300ms), 0);
}

TEST(ServiceManagerTest, WithoutSystemdNothingRuns) {
  ::unsetenv("NOTIFY_SOCKET");
  ::setenv("WATCHDOG_USEC", "200000", 1);
  core::EventLoops loops(1, 1);
  core::ExportTable exports;
  ServiceManager service(loops, exports, [] { return size_t{0}; });
  EXPECT_FALSE(service.enabled());
  service.ready();
  loops.release();
  loops.run();  // returns at once: no timer was armed
  service.stop();
}

}  // namespace
}  // namespace blockway::gateway
