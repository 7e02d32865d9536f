#include "gateway/runtime_exports.hpp"

#include "core/options.hpp"
#include "gateway/snapshot_exports.hpp"
#include "remote/common/poll_until.hpp"
#include "remote/uri.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>

#include <algorithm>
#include <chrono>
#include <optional>


// GCC 12 pairs the operator delete of Asio's awaitable frame with the
// allocator call it inlined into add() and warns; both are Asio's own
// (its recycling allocator). Seen once ExportConfig grew (allow=, listen=).
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

namespace blockway::gateway {

using core::ConfigError;
using core::Export;
using core::offload;
using core::Task;

namespace {

// "ro,cache=/c,mode=writeback" with key=value set (replaced or appended);
// with `drop`, the key taken out instead.
std::string with_option(const std::string& options, const std::string& key, const std::string& value,
                        bool drop = false) {
  std::string out;
  bool replaced = false;
  size_t pos = 0;
  while (pos <= options.size() && !options.empty()) {
    const size_t comma = std::min(options.find(',', pos), options.size());
    std::string item = options.substr(pos, comma - pos);
    if (item.substr(0, item.find('=')) == key) {
      if (replaced || drop) item.clear();  // a repeated key: keep one
      else item = key + "=" + value;
      replaced = true;
    }
    if (!item.empty()) out += (out.empty() ? "" : ",") + item;
    pos = comma + 1;
  }
  if (!replaced && !drop) out += (out.empty() ? "" : ",") + key + "=" + value;
  return out;
}

// with_option for a saved setting made of several options: "qos" is saved as
// "qos-read-iops=100,qos-burst=1", "fuse" as "fuse-uid=1000,fuse-gid=,
// fuse-mode=0640" (an empty one: the mount's, so the key goes), "access" as
// "allow=...\nlisten=..." (an allow list may hold no comma, but the
// separator must not clash with it).
std::string with_options(std::string options, const std::string& key, const std::string& value) {
  if (key != "qos" && key != "access" && key != "fuse") return with_option(options, key, value);
  const char separator = key == "access" ? '\n' : ',';
  for (size_t pos = 0; pos < value.size();) {
    const size_t end = std::min(value.find(separator, pos), value.size());
    const std::string item = value.substr(pos, end - pos);
    if (const auto eq = item.find('='); eq != std::string::npos)
      options = with_option(options, item.substr(0, eq), item.substr(eq + 1), key == "fuse" && eq + 1 == item.size());
    pos = end + 1;
  }
  return options;
}

// The configuration of a run-time export, from its name, URI and option
// string (as export-add gets them and the catalogue keeps them).
ExportConfig parse(const std::string& name, const std::string& uri, const std::string& options) {
  if (name.find(',') != std::string::npos || name.find('=') != std::string::npos)
    throw ConfigError("export name '" + name + "' must not contain ',' or '='");
  if (uri.find(',') != std::string::npos)
    throw ConfigError("the URI must not contain ',' (options go in \"options\")");
  return ExportConfig::parse_spec(name + "=" + uri + (options.empty() ? "" : "," + options));
}

// Waits until nothing holds `exp` any more (sessions, a FUSE node), then
// closes it as shutdown would.
Task<void> close_when_unused(std::shared_ptr<Export> exp) {
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
  while (exp.use_count() > 1) {
    timer.expires_after(std::chrono::milliseconds(100));
    co_await timer.async_wait(boost::asio::use_awaitable);
  }
  co_await exp->device->close();
}

}  // namespace

void RuntimeExports::check_tls(const ExportConfig& cfg) const {
  if (cfg.tls_required && !tls_enabled_)
    throw ConfigError("export '" + cfg.name + "' has tls=require but TLS is off on this daemon, so no client "
                      "could reach it (start the daemon with --tls=on or --tls=require)");
}

// Opens the exports saved by earlier export-add commands. One that cannot
// be opened is logged and skipped (and kept in the catalogue: its remote
// may come back); a name the configuration also defines is the
// configuration's.
void RuntimeExports::open_saved(std::vector<cache::CacheLayer*>& caches) {
  if (!builder_.catalogue_exists()) return;
  for (const auto& saved : builder_.catalogue().runtime_exports()) {
    // The configuration's, also when it failed to open (it is retried): the
    // saved one must not be served beside it, listed twice.
    std::string configured_uri;
    if (auto exp = exports_.find(saved.name)) {
      configured_uri = exp->uri;
    } else {
      std::lock_guard lock(names_mutex_);
      if (auto it = failed_.find(saved.name); it != failed_.end() && it->second.configured)
        configured_uri = it->second.uri + ", which failed to open and is retried";
    }
    if (!configured_uri.empty() && !saved.name.empty()) {
      log_->warn("export '{}' added at run time is also defined in the configuration: serving the "
                 "configuration's ({})", saved.name, configured_uri);
      continue;
    }
    try {
      const auto cfg = parse(saved.name, saved.uri, saved.options);
      check_tls(cfg);
      auto [exp, cache] = builder_.build(cfg);
      if (cache) caches.push_back(cache);
      log_->info("export '{}': {} ({} bytes, added at run time)", exp->name, exp->device->describe(),
                 exp->device->geometry().size);
      exports_.add(std::move(exp));
      std::lock_guard lock(names_mutex_);
      runtime_names_.insert(saved.name);
    } catch (const std::exception& e) {
      log_->error("export '{}' added at run time cannot be opened, skipped (blockway status shows it; "
                  "blockway export remove drops it): {}", saved.name, e.what());
      std::lock_guard lock(names_mutex_);
      failed_[saved.name] = Failed{saved.uri, saved.options, e.what(), std::nullopt};
    }
  }
}

void RuntimeExports::add_failed(const ExportConfig& cfg, const std::string& reason) {
  std::lock_guard lock(names_mutex_);
  failed_[cfg.name] = Failed{cfg.uri, {}, reason, cfg};
}

bool RuntimeExports::is_failed(const std::string& name) const {
  std::lock_guard lock(names_mutex_);
  return failed_.contains(name);
}

void RuntimeExports::start_retrying() {
  if (retry_timer_ || shutting_down_) return;
  {
    std::lock_guard lock(names_mutex_);
    if (failed_.empty()) return;
  }
  retry_timer_ = std::make_unique<boost::asio::steady_timer>(loops_.at(0));
  boost::asio::co_spawn(loops_.at(0), retry_failed(), [log = log_](std::exception_ptr e) {
    if (!e) return;
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      log->error("retrying the failed exports stopped: {}", ex.what());
    }
  });
}

void RuntimeExports::set_shutting_down() {
  shutting_down_ = true;
  if (retry_timer_) retry_timer_->cancel();
}

// Rounds over the failed exports, 2 s after the start and then at a delay
// that doubles up to 60 s: a remote that is back is found soon, one that
// stays down costs a connection attempt a minute. A round in which one
// opened is followed by another at once: it may be the base of a clone tried
// before it (in name order), which would otherwise wait for the next round,
// up to a minute. Ends when nothing is left to retry or the daemon stops.
Task<void> RuntimeExports::retry_failed() {
  constexpr auto kFirst = std::chrono::seconds(2), kLongest = std::chrono::seconds(60);
  auto delay = std::chrono::duration_cast<std::chrono::steady_clock::duration>(kFirst);
  bool wait = true;
  while (!shutting_down_) {
    if (wait) {
      retry_timer_->expires_after(delay);
      boost::system::error_code ec;
      co_await retry_timer_->async_wait(boost::asio::redirect_error(boost::asio::use_awaitable, ec));
      delay = std::min<std::chrono::steady_clock::duration>(delay * 2, kLongest);
    }
    if (shutting_down_) break;
    std::vector<std::string> names;
    {
      std::lock_guard lock(names_mutex_);
      for (const auto& [name, failed] : failed_) names.push_back(name);
    }
    if (names.empty()) break;
    bool opened = false;
    for (const auto& name : names) {
      if (shutting_down_) break;
      auto attempt = retry_one(name);
      if (co_await std::move(attempt)) opened = true;
    }
    wait = !opened;  // each round without a wait opens one more: bounded
  }
}

Task<RuntimeExports::Opened> RuntimeExports::open_on_pool(ExportConfig cfg, std::function<void()> after_open,
                                                          std::function<bool()> cancelled) {
  auto open = [this, cfg = std::move(cfg), after_open = std::move(after_open),
               cancelled = std::move(cancelled)]() mutable -> Opened {
    remote::common::CancelOpensWhen cancel(std::move(cancelled));
    Opened o;
    try {
      check_tls(cfg);
      o.built = builder_.build(std::move(cfg));
      if (after_open) after_open();
    } catch (const std::exception& e) {
      o.error = e.what();
    }
    return o;
  };
  // Named first, then awaited: GCC 12 destroys non-trivial captures (cfg,
  // the callables) of a lambda passed inside a co_await expression twice.
  auto opening = offload(loops_.blocking(), std::move(open));
  co_return co_await std::move(opening);
}

Task<core::AsyncMutex::Guard> RuntimeExports::lock_for_command() {
  ++commands_waiting_;
  auto locking = lock_.lock();
  auto guard = co_await std::move(locking);
  --commands_waiting_;
  co_return guard;
}

Task<bool> RuntimeExports::retry_one(std::string name) {
  auto guard = co_await lock_.lock();
  std::optional<Failed> failed;
  {
    std::lock_guard lock(names_mutex_);
    if (auto it = failed_.find(name); it != failed_.end()) failed = it->second;
  }
  // Removed meanwhile, or added again under its name (export-add); a control
  // command waiting for lock_ goes first.
  if (!failed || retry_should_yield() || exports_.find(name)) co_return false;
  Opened opened;
  try {
    auto opening = open_on_pool(failed->configured ? *failed->configured : parse(name, failed->uri, failed->options),
                                {}, [this] { return retry_should_yield(); });
    opened = co_await std::move(opening);
  } catch (const std::exception& e) {  // parse()
    opened.error = e.what();
  }
  auto& exp = opened.built.exp;
  if (!opened.error.empty() || shutting_down_) {
    if (exp) co_await exp->device->close();
    // Opened as the daemon began to stop, or abandoned for a control
    // command (tried again in the next round): not an attempt. One that
    // opened while a command waited is kept (the command waits for its add).
    if (opened.error.empty() || retry_should_yield()) co_return false;
    std::lock_guard lock(names_mutex_);
    if (auto it = failed_.find(name); it != failed_.end()) {
      ++it->second.attempts;
      // Each attempt at debug; a new reason (the remote answers now, but
      // differently) at warn.
      if (it->second.reason != opened.error) log_->warn("export '{}' still cannot be opened: {}", name, opened.error);
      else log_->debug("export '{}' still cannot be opened (attempt {}): {}", name, it->second.attempts, opened.error);
      it->second.reason = opened.error;
    }
    co_return false;
  }
  unsigned attempts = 0;
  {
    std::lock_guard lock(names_mutex_);
    auto it = failed_.find(name);
    if (it != failed_.end()) attempts = it->second.attempts + 1;
    failed_.erase(name);
    if (!failed->configured) runtime_names_.insert(name);
  }
  if (opened.built.cache) opened.built.cache->start();
  exports_.add(exp);
  publish_snapshots(exports_, exp, builder_.snapshots_of(exp));
  log_->info("export '{}': {} ({} bytes) opened at attempt {}", name, exp->device->describe(),
             exp->device->geometry().size, attempts);
  if (on_opened_) on_opened_(name);
  co_return true;
}

// The saved exports that failed to open, for status, list and stats.
Json RuntimeExports::failed_json() const {
  Json list = Json::array();
  std::lock_guard lock(names_mutex_);
  for (const auto& [name, f] : failed_) {
    Json e;
    e["name"] = name;
    e["uri"] = remote::redact_uri(f.uri);
    e["options"] = f.options;
    e["state"] = "failed: " + f.reason;
    e["error"] = f.reason;
    e["mode"] = "failed";
    e["clients"] = 0;
    e["configured"] = f.configured.has_value();
    e["attempts"] = f.attempts;
    list.push_back(std::move(e));
  }
  return list;
}

// Saves a run-time change (hook of the "mode" and "prefetch-rate"
// commands): into the saved options of an export added at run time, else
// as a run-time setting over the configuration's value.
Task<std::string> RuntimeExports::persist(std::shared_ptr<Export> exp, std::string key, std::string value) {
  const std::string name = exp->name;
  bool runtime = false;
  {
    std::lock_guard lock(names_mutex_);
    runtime = runtime_names_.contains(name);
  }
  const std::string config_value = builder_.configured_value(name, key);
  cache::MetaStore* store = builder_.open_catalogue_or_null();  // open: the export has a cache
  if (!store && (key == "qos" || key == "access" || key == "fuse")) {
    // QoS applies to exports without a cache too: the first change opens
    // (makes) the catalogue.
    store = co_await open_catalogue();
  }
  auto save = [this, store, exp, name, key, value, runtime, config_value]() -> std::string {
    if (!store) return "not saved: no catalogue";
    std::lock_guard saving(settings_mutex_);
    // Removed meanwhile (export-remove forgot its settings), perhaps with a
    // new export added under its name: nothing of this one to save.
    if (exports_.find(name) != exp) return {};
    try {
      if (runtime) {
        for (const auto& e : store->runtime_exports())
          if (e.name == name) store->update_runtime_export_options(name, with_options(e.options, key, value));
      } else if (config_value.empty()) {
        return "not saved: the configuration's " + key + " of '" + name + "' is unknown";
      } else if (value == config_value) {
        store->forget_runtime_setting(name, key);  // the configuration says so anyway
      } else {
        store->save_runtime_setting(name, {key, value, config_value});
      }
      return {};
    } catch (const std::exception& e) {
      return std::string("not saved in the catalogue, so it lasts until the daemon stops: ") + e.what();
    }
  };
  auto saving = offload(loops_.blocking(), std::move(save));
  std::string warning = co_await std::move(saving);
  if (!warning.empty()) log_->warn("export '{}': {} {}: {}", name, key, value, warning);
  co_return warning;
}

Task<Json> RuntimeExports::add(const Json& req) {
  const auto name = arg_string(req, "name");
  const auto uri = arg_string(req, "uri");
  const auto options = req.contains("options") ? arg_string(req, "options") : std::string();
  const ExportConfig cfg = parse(name, uri, options);  // ConfigError: bad-request
  check_tls(cfg);
  auto guard = co_await lock_for_command();
  if (shutting_down_) throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
  if (exports_.find(name)) throw ControlError("refused", EEXIST, "export '" + name + "' already exists");
  auto save = [this, name, uri = cfg.uri, options] {
    if (!shutting_down_) builder_.catalogue().save_runtime_export({name, uri, options});
  };
  auto opening = open_on_pool(cfg, std::move(save), [this] { return shutting_down_.load(); });
  Opened opened = co_await std::move(opening);
  auto& exp = opened.built.exp;
  if (!opened.error.empty()) {
    if (exp) co_await exp->device->close();
    // Abandoned (or failed) as the daemon began to stop.
    if (shutting_down_) throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
    // Options the backend or cache reject, a missing image, an unreachable
    // remote: all "failed", with the opener's message.
    throw ControlError("failed", EIO, "cannot add export '" + name + "': " + opened.error);
  }
  if (shutting_down_) {
    // The daemon began to stop while the export was opening: the drain
    // would not close it, so close it here and add nothing; nor may it come
    // back at the next start (forgotten on the pool, not on this loop).
    auto forget = offload(loops_.blocking(), [this, name]() -> bool {
      try {
        builder_.catalogue().remove_runtime_export(name);
        return true;
      } catch (const std::exception&) {
        return false;
      }
    });
    if (!co_await std::move(forget)) log_->warn("export '{}': could not forget it in the catalogue", name);
    co_await exp->device->close();
    throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
  }
  if (opened.built.cache) opened.built.cache->start();
  exports_.add(exp);
  publish_snapshots(exports_, exp, builder_.snapshots_of(exp));
  {
    std::lock_guard lock(names_mutex_);
    runtime_names_.insert(name);
    failed_.erase(name);  // added again: the saved entry was replaced
  }
  log_->info("export '{}': {} ({} bytes) added at run time", name, exp->device->describe(),
             exp->device->geometry().size);
  co_return export_json(*exp, 0);
}

Task<cache::MetaStore*> RuntimeExports::open_catalogue() {
  if (auto* store = builder_.open_catalogue_or_null()) co_return store;
  auto guard = co_await lock_for_command();
  auto open = [this]() -> cache::MetaStore* {
    try {
      return &builder_.catalogue();
    } catch (const std::exception& e) {
      log_->warn("cannot open the catalogue: {}", e.what());
      return nullptr;
    }
  };
  co_return co_await offload(loops_.blocking(), std::move(open));
}

Task<Json> RuntimeExports::remove(const Json& req) {
  const auto name = arg_string(req, "name");
  const bool force = arg_bool(req, "force", false);
  auto guard = co_await lock_for_command();
  auto exp = name.empty() ? nullptr : exports_.find(name);
  if (!exp) {
    auto removing = remove_failed(name);
    co_return co_await std::move(removing);
  }
  std::string clones;
  for (const auto& other : exports_.list()) {
    if (other->clone_of != name) continue;
    // A flattened clone no longer reads its base.
    const auto* snapshots = builder_.snapshots_of(other);
    if (snapshots && snapshots->flatten_progress().state == core::FlattenState::done) continue;
    clones += (clones.empty() ? "'" : ", '") + other->name + "'";
  }
  if (!clones.empty())
    throw ControlError("refused", EBUSY,
                       "export '" + name + "' is the base of clone(s) " + clones +
                           "; remove them first, or flatten them (blockway flatten CLONE) so they no longer need it");
  // A clone's snapshot exports go with it: their clients count as its own.
  const long clients = export_clients(exp) + snapshot_clients(exports_, name);
  const std::string devices = devices_of_ ? devices_of_(name) : std::string();
  if (!devices.empty() && !force)
    throw ControlError("refused", EBUSY,
                       "export '" + name + "' is attached as " + devices +
                           "; disconnect it first (blockway disconnect), or force: the devices keep it until "
                           "they are disconnected");
  if (clients > 0 && !force)
    throw ControlError("refused", EBUSY,
                       "export '" + name + "' has " + std::to_string(clients) +
                           " client connection(s); disconnect them first, or force: existing "
                           "connections keep it until they close, new ones cannot open it");
  exports_.remove(name);
  unpublish_snapshots(exports_, name);
  {
    std::lock_guard lock(names_mutex_);
    runtime_names_.erase(name);
  }
  // Its saved run-time export entry, and the run-time settings (mode,
  // prefetch rate) saved over its configuration: removed, it is gone with
  // them; one that comes back (from the configuration at the next start, or
  // added again) starts from its own options.
  auto forget = [this, name]() -> int {
    try {
      if (!builder_.catalogue_exists()) return 0;
      auto& store = builder_.catalogue();
      std::lock_guard saving(settings_mutex_);
      const size_t settings = store.forget_runtime_settings(name);
      if (settings) log_->info("export '{}': its {} run-time setting(s) are forgotten", name, settings);
      return store.remove_runtime_export(name) ? 1 : 0;
    } catch (const std::exception& e) {
      log_->error("export '{}': the catalogue could not be updated: {}", name, e.what());
      return -1;
    }
  };
  auto forgetting = offload(loops_.blocking(), std::move(forget));  // named: see add()
  const int forgotten = co_await std::move(forgetting);
  Json out;
  out["name"] = name;
  out["clients"] = clients;
  std::string message = "export '" + name + "' removed";
  if (exp.use_count() > 1) {
    // Still held: NBD sessions, a handshake that found it just before, files
    // open in the FUSE mount, another control request. Closing it now would
    // acknowledge their writes into a closed cache; close it once they let go.
    if (clients > 0) message += "; it closes when its " + std::to_string(clients) + " client connection(s) end";
    auto ex = co_await boost::asio::this_coro::executor;
    boost::asio::co_spawn(ex, close_when_unused(std::move(exp)), boost::asio::detached);
  } else {
    co_await exp->device->close();
    exp.reset();
  }
  if (forgotten == 0) message += " (it comes from the configuration, so it is back at the next start)";
  if (forgotten < 0) message += " (warning: the catalogue could not be updated; it may come back at the next start)";
  out["message"] = message;
  log_->info("{}", message);
  co_return out;
}

// export-remove of an export that failed to open: no more retries, and a
// saved one is forgotten.
Task<Json> RuntimeExports::remove_failed(std::string name) {
  std::optional<Failed> failed;
  {
    std::lock_guard lock(names_mutex_);
    if (auto it = failed_.find(name); it != failed_.end()) failed = it->second;
  }
  if (!failed) throw ControlError("unknown-export", ENOENT, "no export named '" + name + "'");
  cache::MetaStore* store = builder_.open_catalogue_or_null();  // open: open_saved() read it
  auto forget = [this, store, name]() -> std::string {
    try {
      std::lock_guard saving(settings_mutex_);
      if (store) store->forget_runtime_settings(name);
      if (store) store->remove_runtime_export(name);
      return {};
    } catch (const std::exception& e) {
      return e.what();
    }
  };
  auto forgetting = offload(loops_.blocking(), std::move(forget));
  const std::string error = co_await std::move(forgetting);
  if (!error.empty())
    throw ControlError("failed", EIO, "export '" + name + "' could not be forgotten in the catalogue: " + error);
  {
    std::lock_guard lock(names_mutex_);
    failed_.erase(name);
  }
  Json out;
  out["name"] = name;
  out["clients"] = 0;
  // No longer retried. A configured one is back (and tried) at the next start.
  out["message"] = "export '" + name + "' (which failed to open: " + failed->reason + ") removed; " +
                   (failed->configured ? "it comes from the configuration, so it is back at the next start"
                                       : "it is forgotten in the catalogue");
  log_->info("{}", out["message"].get<std::string>());
  co_return out;
}

}  // namespace blockway::gateway
