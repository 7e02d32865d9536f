// ServiceManager: what the daemon tells systemd while it runs (Type=notify):
// READY=1 once every listener and export is up, a STATUS= line refreshed
// every few seconds (exports, clients, prefetch progress), STOPPING=1 at
// shutdown, and the watchdog.
//
// The watchdog proves every event loop is alive, not only the process: each
// loop runs a timer that stamps its heartbeat every quarter of the watchdog
// interval, and a sender thread sends WATCHDOG=1 every quarter interval only
// while every heartbeat is younger than half the interval. A wedged loop (a
// blocking call, a livelock) thus stops the pings and systemd restarts the
// daemon after WatchdogSec=.
//
// Thread model: constructed, started and stopped on the main thread or loop 0.
// Heartbeats are atomics written by their loops and read by the sender thread;
// the status timer runs on loop 0. Without NOTIFY_SOCKET nothing runs.
#pragma once

#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "gateway/systemd_notify.hpp"

#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace blockway::gateway {

class ServiceManager {
 public:
  // `clients` counts the NBD connections (called on loop 0).
  ServiceManager(core::EventLoops& loops, core::ExportTable& exports, std::function<size_t()> clients);
  ~ServiceManager();
  ServiceManager(const ServiceManager&) = delete;
  ServiceManager& operator=(const ServiceManager&) = delete;

  [[nodiscard]] bool enabled() const noexcept { return notify_.enabled(); }
  // STATUS= before the exports open.
  void starting(const std::string& what);
  // READY=1 with the first STATUS=; starts the status timer and the watchdog.
  void ready();
  // STOPPING=1. The watchdog keeps running while the daemon drains.
  void stopping();
  // Ends the timers and the sender (so that the loops can run out of work).
  // Call on loop 0 at the end of the shutdown sequence. Idempotent.
  void stop();

  // "2 exports, 1 client; prefetch vm1 45%", the STATUS= text.
  [[nodiscard]] std::string status() const;

 private:
  struct Heartbeat {
    std::unique_ptr<boost::asio::steady_timer> timer;
    std::atomic<int64_t> last{0};  // steady_clock, nanoseconds
  };
  void beat(size_t loop);
  void refresh_status();
  void send_pings(std::stop_token stop);

  core::EventLoops& loops_;
  core::ExportTable& exports_;
  std::function<size_t()> clients_;
  SystemdNotify notify_;
  std::chrono::nanoseconds period_{};  // a quarter of the watchdog interval
  std::vector<std::unique_ptr<Heartbeat>> heartbeats_;
  std::unique_ptr<boost::asio::steady_timer> status_timer_;
  std::atomic<bool> stopped_{false};
  bool stopping_ = false;
  std::jthread sender_;
};

}  // namespace blockway::gateway
