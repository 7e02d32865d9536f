// RuntimeExports: the exports added and removed at run time through the
// control socket (export-add, export-remove), saved in the catalogue's
// runtime_exports table and opened again at start, and the run-time settings
// (mode, prefetch-rate) the control plane saves for any export.
//
// Thread model: the handlers run on event loop 0; one add or remove at a time
// (lock_), which also serialises every use of the StackBuilder after start-up.
// Opening an export may block (connecting to a remote, creating a cache
// file), so it runs on the blocking pool.
//
// An export that cannot be opened at start (its remote is down, its image
// missing; configured or saved) does not stop the others: it is listed as
// failed, and retry_failed() (a coroutine on loop 0, started by
// start_retrying()) opens it again with a growing delay (2 s doubling to
// 60 s) until it opens, it is removed, or the daemon stops. A retry holds
// lock_ like export-add, but gives its open up (poll_until's
// CancelOpensWhen) as soon as a control command waits for lock_ or the
// daemon stops: a remote that accepts and never answers the handshake must
// not hold them for its io-timeout.
//
// Removing an export that clients are connected to is refused (EBUSY) unless
// forced; forced, the export leaves the table at once (no new client can open
// it) and the sessions that hold it keep working until they disconnect, after
// which it is closed (its cache persisted) like at shutdown.
#pragma once

#include "cache/cache_layer.hpp"
#include "core/async_mutex.hpp"
#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "core/logging.hpp"
#include "gateway/control_protocol.hpp"
#include "gateway/stack_builder.hpp"

#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace blockway::gateway {

class RuntimeExports {
 public:
  RuntimeExports(StackBuilder& builder, core::ExportTable& exports, core::EventLoops& loops)
      : builder_(builder), exports_(exports), loops_(loops), log_(core::logger("control")) {}
  RuntimeExports(const RuntimeExports&) = delete;
  RuntimeExports& operator=(const RuntimeExports&) = delete;

  // Opens the exports saved by earlier export-add commands. One that cannot
  // be opened is logged and skipped (and kept in the catalogue: its remote
  // may come back); a name the configuration also defines is the
  // configuration's. The caches of those opened are appended to `caches`, to
  // be started with the configured exports'.
  void open_saved(std::vector<cache::CacheLayer*>& caches);
  // A configured export that could not be opened at start: listed as failed
  // and retried once start_retrying() runs.
  void add_failed(const ExportConfig& cfg, const std::string& reason);
  // Starts retrying the failed exports (on loop 0), if there are any. Called
  // once the daemon serves.
  void start_retrying();
  // Called on loop 0 with each export a retry opened (and added to the
  // table): the kernel devices that wait for it are attached then.
  void set_on_opened(std::function<void(const std::string&)> fn) { on_opened_ = std::move(fn); }
  // Whether `name` is a failed export waiting for a retry.
  [[nodiscard]] bool is_failed(const std::string& name) const;
  // The saved exports that failed to open, for status, list and stats.
  Json failed_json() const;
  // Saves a run-time change (hook of the "mode" and "prefetch-rate"
  // commands): into the saved options of an export added at run time, else
  // as a run-time setting over the configuration's value.
  core::Task<std::string> persist(std::shared_ptr<core::Export> exp, std::string key, std::string value);
  // export-add {name, uri, options?}: opens the export on the blocking pool,
  // saves it, starts its cache and adds it to the table.
  core::Task<Json> add(const Json& req);
  // export-remove {name, force?}.
  core::Task<Json> remove(const Json& req);
  // From now on export-add is refused (the daemon is stopping), failed
  // exports are no longer retried, and an open in flight on a remote is
  // abandoned. Called at the stop signal and again after the drain. Loop 0.
  void set_shutting_down();
  // Whether the daemon serves TLS at all: an export with tls=require is
  // refused (export-add) or skipped (saved) on a daemon without it, since
  // no client could ever reach it. Set before open_saved().
  void set_tls_enabled(bool on) { tls_enabled_ = on; }
  // The kernel devices an export is attached as ("/dev/nbd0 /dev/nbd1"),
  // named when export-remove refuses it. Set before the loops run.
  void set_device_lookup(std::function<std::string(const std::string&)> fn) { devices_of_ = std::move(fn); }
  // The catalogue, opened (made) on the blocking pool under the builder's
  // lock if it is not open yet; nullptr (logged) if it cannot be.
  core::Task<cache::MetaStore*> open_catalogue();

 private:
  // ConfigError for tls=require on a daemon without TLS.
  void check_tls(const ExportConfig& cfg) const;

  struct Failed {
    std::string uri, options, reason;
    std::optional<ExportConfig> configured;  // set for a configured export, else a saved one
    unsigned attempts = 1;
  };
  // What open_on_pool() gives back: the export's stack, or why it could not
  // be built (with whatever was built, to close).
  struct Opened {
    StackBuilder::Built built;
    std::string error;
  };
  // Builds `cfg` on the blocking pool, then runs `after_open` there (add():
  // saves it in the catalogue); an exception of either is the error. An open
  // that waits on a remote is abandoned (an error) soon after `cancelled`
  // says so (common::CancelOpensWhen). Call with lock_ held.
  core::Task<Opened> open_on_pool(ExportConfig cfg, std::function<void()> after_open,
                                  std::function<bool()> cancelled);
  // Whether a background retry should give its open up: the daemon stops,
  // or export-add/export-remove wait for lock_ (a remote that accepts and
  // never answers would hold them for its io-timeout).
  [[nodiscard]] bool retry_should_yield() const { return shutting_down_ || commands_waiting_ > 0; }
  // lock_ for export-add/export-remove: a background retry that holds it
  // gives its open up.
  core::Task<core::AsyncMutex::Guard> lock_for_command();

  // The retries: one round over the failed exports after each delay.
  core::Task<void> retry_failed();
  // One attempt at opening the failed export `name`; true if it opened.
  core::Task<bool> retry_one(std::string name);

  // export-remove of a saved export that failed to open: forget it.
  core::Task<Json> remove_failed(std::string name);

  StackBuilder& builder_;
  std::function<std::string(const std::string&)> devices_of_;
  core::ExportTable& exports_;
  core::EventLoops& loops_;
  std::shared_ptr<spdlog::logger> log_;
  core::AsyncMutex lock_;
  bool tls_enabled_ = false;
  // Held (on the blocking pool) while a run-time setting is saved or an
  // export's saved entry and settings are forgotten: a save is a
  // read-modify-write of a run-time export's options, and one that loses the
  // race with export-remove must find the export gone, not save it again.
  std::mutex settings_mutex_;
  std::atomic<bool> shutting_down_{false};
  std::atomic<int> commands_waiting_{0};  // export-add/export-remove waiting for lock_
  // Names of the exports this class opened (run-time ones), and the saved
  // ones that failed to open; read by the control plane's hooks.
  mutable std::mutex names_mutex_;
  std::set<std::string> runtime_names_;
  std::map<std::string, Failed> failed_;
  // The delay of retry_failed(); cancelled by set_shutting_down(). Loop 0.
  std::unique_ptr<boost::asio::steady_timer> retry_timer_;
  std::function<void(const std::string&)> on_opened_;
};

}  // namespace blockway::gateway
