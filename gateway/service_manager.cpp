#include "gateway/service_manager.hpp"

#include "core/logging.hpp"

#include <boost/asio/post.hpp>

#include <condition_variable>
#include <cstdio>
#include <mutex>

namespace blockway::gateway {

namespace {
constexpr auto kStatusEvery = std::chrono::seconds(5);

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string plural(size_t n, const char* noun) {
  return std::to_string(n) + " " + noun + (n == 1 ? "" : "s");
}
}  // namespace

ServiceManager::ServiceManager(core::EventLoops& loops, core::ExportTable& exports, std::function<size_t()> clients)
    : loops_(loops), exports_(exports), clients_(std::move(clients)) {}

ServiceManager::~ServiceManager() {
  if (sender_.joinable()) {
    sender_.request_stop();
    sender_.join();
  }
}

void ServiceManager::starting(const std::string& what) { notify_.send("STATUS=" + what); }

std::string ServiceManager::status() const {
  const auto list = exports_.list();
  std::string out = "serving " + plural(list.size(), "export") + " to " + plural(clients_(), "client");
  std::string prefetch;
  for (const auto& exp : list) {
    if (exp->control == nullptr) continue;
    const auto p = exp->control->report().prefetch;
    if (p.state != core::PrefetchState::running && p.state != core::PrefetchState::paused &&
        p.state != core::PrefetchState::failed)
      continue;
    char pct[32];
    std::snprintf(pct, sizeof pct, "%.1f%%",
                  p.total_bytes ? 100.0 * static_cast<double>(p.done_bytes) / static_cast<double>(p.total_bytes)
                                : 0.0);
    prefetch += (prefetch.empty() ? "; prefetch " : ", ") + exp->name + " " + pct;
    if (p.state != core::PrefetchState::running) prefetch += " (" + std::string(core::to_string(p.state)) + ")";
  }
  return out + prefetch;
}

void ServiceManager::ready() {
  if (!enabled()) return;
  notify_.send("READY=1\nSTATUS=" + status());
  status_timer_ = std::make_unique<boost::asio::steady_timer>(loops_.at(0));
  refresh_status();
  if (auto interval = notify_.watchdog()) {
    period_ = std::chrono::duration_cast<std::chrono::nanoseconds>(*interval) / 4;
    core::logger("systemd")->info("watchdog: every event loop checked every {} ms",
                                  std::chrono::duration_cast<std::chrono::milliseconds>(period_).count());
    for (size_t i = 0; i < loops_.size(); ++i) {
      auto hb = std::make_unique<Heartbeat>();
      hb->timer = std::make_unique<boost::asio::steady_timer>(loops_.at(i));
      hb->last = now_ns();
      heartbeats_.push_back(std::move(hb));
    }
    // Armed on each loop's own thread: a timer belongs to its loop.
    for (size_t i = 0; i < loops_.size(); ++i) boost::asio::post(loops_.at(i), [this, i] { beat(i); });
    sender_ = std::jthread([this](std::stop_token st) { send_pings(st); });
  }
}

void ServiceManager::beat(size_t loop) {
  auto& hb = *heartbeats_[loop];
  if (stopped_) return;
  hb.last = now_ns();
  hb.timer->expires_after(period_);
  hb.timer->async_wait([this, loop](const boost::system::error_code& ec) {
    if (!ec) beat(loop);
  });
}

void ServiceManager::send_pings(std::stop_token stop) {
  std::mutex m;
  std::condition_variable_any cv;
  const int64_t stale = 2 * period_.count();  // half the interval
  bool was_alive = true;
  while (!stop.stop_requested()) {
    const int64_t now = now_ns();
    bool alive = true;
    for (size_t i = 0; i < heartbeats_.size(); ++i) {
      if (now - heartbeats_[i]->last.load() > stale) {
        alive = false;
        if (was_alive)
          core::logger("systemd")->error("event loop {} has not run for {} ms: no watchdog ping", i,
                                         (now - heartbeats_[i]->last.load()) / 1000000);
      }
    }
    if (alive) notify_.send("WATCHDOG=1");
    was_alive = alive;
    std::unique_lock lock(m);
    cv.wait_for(lock, stop, period_, [] { return false; });
  }
}

void ServiceManager::refresh_status() {
  if (stopped_) return;
  status_timer_->expires_after(kStatusEvery);
  status_timer_->async_wait([this](const boost::system::error_code& ec) {
    if (ec || stopped_) return;
    notify_.send("STATUS=" + (stopping_ ? "stopping: " + plural(clients_(), "client") + " left" : status()));
    refresh_status();
  });
}

void ServiceManager::stopping() {
  if (!enabled()) return;
  stopping_ = true;
  notify_.send("STOPPING=1\nSTATUS=stopping: " + plural(clients_(), "client") + " left");
}

void ServiceManager::stop() {
  if (stopped_.exchange(true)) return;
  if (status_timer_) status_timer_->cancel();
  for (size_t i = 0; i < heartbeats_.size(); ++i)
    boost::asio::post(loops_.at(i), [this, i] { heartbeats_[i]->timer->cancel(); });
  if (sender_.joinable()) sender_.request_stop();
}

}  // namespace blockway::gateway
