#include "gateway/daemon.hpp"

#include "cache/cache_layer.hpp"
#include "core/async_mutex.hpp"
#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "core/logging.hpp"
#include "core/options.hpp"
#include "core/paths.hpp"
#include "core/retry_layer.hpp"
#include "fuse/fuse_front_end.hpp"
#include "gateway/control_protocol.hpp"
#include "gateway/control_server.hpp"
#include "nbd/server.hpp"
#include "remote/registry.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/signal_set.hpp>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <set>

namespace blockway::gateway {

using core::AsyncMutex;
using core::BlockDevice;
using core::ByteRange;
using core::CheckedDevice;
using core::ConfigError;
using core::default_control_socket;
using core::default_data_dir;
using core::EventLoops;
using core::Export;
using core::ExportTable;
using core::ExtentList;
using core::ListenAddress;
using core::logger;
using core::offload;
using core::RetryLayer;
using core::RetryOptions;
using core::Task;

namespace {

constexpr uint64_t kDemoImageSize = 1ull << 30;

// The embedded default: a sparse 1 GiB demo image in the data directory.
ExportConfig demo_export(const std::string& data_dir) {
  std::error_code ec;
  std::filesystem::create_directories(data_dir, ec);
  if (ec) throw ConfigError("cannot create data directory " + data_dir + ": " + ec.message());
  const std::string path = data_dir + "/demo.img";
  if (!std::filesystem::exists(path)) {
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) throw ConfigError("cannot create demo image " + path + ": " + std::strerror(errno));
    const int rc = ::ftruncate(fd, static_cast<off_t>(kDemoImageSize));
    ::close(fd);
    if (rc != 0) throw ConfigError("cannot size demo image " + path + ": " + std::strerror(errno));
  }
  ExportConfig e;
  e.name = "demo";
  e.uri = "file://" + path;
  e.description = "blockway demo image (1 GiB, file backend)";
  return e;
}

// Everything an export's device chain needs from the daemon.
struct OpenContext {
  EventLoops& loops;
  std::string data_dir;
  std::unique_ptr<cache::MetaStore> catalogue;  // opened when the first cache needs it
  std::vector<cache::CacheLayer*> caches;        // started once every export is open
  // Per cached export, the settings its configuration gives (for a run-time
  // export: its saved options) before run-time changes apply: what a run-time
  // change is recorded against. Written while opening, read by the control
  // plane.
  std::mutex configured_mutex;
  std::map<std::string, std::map<std::string, std::string>> configured;

  cache::MetaStore& open_catalogue() {
    if (!catalogue) {
      std::error_code ec;
      std::filesystem::create_directories(data_dir, ec);
      if (ec) throw ConfigError("cannot create data directory " + data_dir + ": " + ec.message());
      try {
        catalogue = std::make_unique<cache::MetaStore>(data_dir + "/catalogue.db");
      } catch (const std::runtime_error& e) {
        throw ConfigError(e.what());
      }
    }
    return *catalogue;
  }
};

// The stand-in remote of an export detached in an earlier run, or nullptr.
// The backend and retry options are still checked (and taken).
std::unique_ptr<BlockDevice> open_detached_export(ExportConfig& cfg, const remote::Backend& backend,
                                                  core::Options& options, OpenContext& ctx) {
  std::unique_ptr<BlockDevice> device;
  try {
    device = cache::open_if_detached(ctx.open_catalogue(), cfg.name, cfg.uri);
  } catch (const std::runtime_error& e) {
    throw ConfigError("export '" + cfg.name + "': " + e.what());
  }
  if (device) {
    backend.check(cfg.uri, options);
    if (backend.retry()) (void)RetryOptions::take_from(options);
  }
  return device;
}

// Run-time changes of the write mode and the prefetch rate (blockway mode,
// blockway prefetch rate) are saved with the value the configuration had then;
// at start they apply while the configuration still says that value. Once the
// configuration says something else, the edit is newer: it wins and the saved
// change is dropped.
void apply_runtime_settings(const std::string& name, cache::CacheConfig& c, OpenContext& ctx) {
  const std::string config_mode = cache::to_string(c.mode);
  const std::string config_rate = std::to_string(c.prefetch_rate);
  {
    std::lock_guard lock(ctx.configured_mutex);
    ctx.configured[name] = {{"mode", config_mode}, {"prefetch-rate", config_rate}};
  }
  auto log = logger("daemon");
  auto& store = ctx.open_catalogue();
  try {
    for (const auto& s : store.runtime_settings(name)) {
      const std::string now = s.key == "mode" ? config_mode : s.key == "prefetch-rate" ? config_rate : "";
      if (now.empty()) continue;  // a setting this version does not know
      if (s.config_value != now) {
        log->info("export '{}': the configuration's {} changed from {} to {} since it was set to {} at run time: "
                  "the configuration's {} applies", name, s.key, s.config_value, now, s.value, now);
        store.forget_runtime_setting(name, s.key);
        continue;
      }
      if (s.key == "mode") {
        if (s.value == "writethrough") c.mode = cache::WriteMode::writethrough;
        else if (s.value == "writeback") c.mode = cache::WriteMode::writeback;
        else if (s.value == "writeback-local") c.mode = cache::WriteMode::writeback_local;
        else continue;
      } else {
        uint64_t rate = 0;
        auto [end, ec] = std::from_chars(s.value.data(), s.value.data() + s.value.size(), rate);
        if (ec != std::errc{} || end != s.value.data() + s.value.size()) continue;
        c.prefetch_rate = rate;
      }
      log->info("export '{}': {} {} (set at run time; the configuration says {})", name, s.key, s.value, now);
    }
  } catch (const std::runtime_error& e) {
    throw ConfigError("export '" + name + "': " + e.what());
  }
}

std::shared_ptr<Export> open_export(ExportConfig cfg, OpenContext& ctx) {
  auto& loops = ctx.loops;
  core::Options options(cfg.options, "export '" + cfg.name + "'");
  auto cache_cfg = cache::CacheConfig::take_from(options);
  if (cache_cfg) apply_runtime_settings(cfg.name, *cache_cfg, ctx);
  if (!cache_cfg && std::filesystem::exists(ctx.data_dir + "/catalogue.db")) {
    // Serving an export without the cache that still holds its unwritten data
    // would silently show clients old bytes.
    auto& store = ctx.open_catalogue();
    if (auto rec = store.find(cfg.name)) {
      if (store.get_state(cfg.name, "detached").value_or("") == "1" && cfg.uri != "file://" + rec->cache_path)
        throw ConfigError("export '" + cfg.name + "' is detached (local mode): its image is " + rec->cache_path +
                          " and " + rec->remote + " may be out of date; start it with its cache (cache=" +
                          std::filesystem::path(rec->cache_path).parent_path().string() +
                          "), or serve the image itself with file://" + rec->cache_path);
      const auto dirty = store.load_bitmap(cfg.name, cache::BitmapKind::dirty, (rec->size / rec->chunk_size) / 64 + 2);
      if (std::any_of(dirty.begin(), dirty.end(), [](uint64_t w) { return w != 0; }))
        throw ConfigError("export '" + cfg.name + "': its cache " + rec->cache_path +
                          " holds data not yet written to " + rec->remote +
                          "; start it with its cache (cache=" +
                          std::filesystem::path(rec->cache_path).parent_path().string() + ",mode=" + rec->mode +
                          ") so the data is written back");
    }
  }
  const remote::OpenEnv env{cfg.read_only, &loops.blocking(), &loops};
  std::unique_ptr<BlockDevice> device;
  RetryLayer* retry_layer = nullptr;  // owned by the device chain, like the cache
  try {
    const remote::Backend& backend = remote::backend_for(cfg.uri);
    // A detached export (local mode) never opens its remote again.
    if (cache_cfg) device = open_detached_export(cfg, backend, options, ctx);
    if (!device && backend.open_local) device = backend.open_local(cfg.uri, options, env);
    if (!device && backend.open_remote) {
      // A network session can drop: reconnect and retry right above the remote.
      const RetryOptions retry = RetryOptions::take_from(options);
      auto layer = std::make_unique<RetryLayer>(backend.open_remote(cfg.uri, options, env), retry);
      retry_layer = layer.get();
      device = std::move(layer);
    }
  } catch (const remote::BackendError& e) {
    throw ConfigError("export '" + cfg.name + "': " + e.what());
  }
  options.finish();
  auto exp = std::make_shared<Export>();
  exp->name = cfg.name;
  exp->description = cfg.description;
  exp->uri = cfg.uri;
  cache::CacheLayer* cache_layer = nullptr;
  if (cache_cfg) {
    ctx.open_catalogue();
    cache::CacheLayer::Params params;
    params.export_name = cfg.name;
    params.remote_uri = cfg.uri;
    params.config = *cache_cfg;
    params.store = ctx.catalogue.get();
    params.blocking = &loops.blocking();
    params.background = loops.at(0).get_executor();
    try {
      auto layer = std::make_unique<cache::CacheLayer>(std::move(device), std::move(params));
      cache_layer = layer.get();
      device = std::move(layer);
    } catch (const std::runtime_error& e) {
      throw ConfigError("export '" + cfg.name + "': " + e.what());
    }
  }
  exp->device = std::make_shared<CheckedDevice>(std::move(device), cfg.read_only);
  if (retry_layer) exp->remote_health = [retry_layer] { return retry_layer->health(); };
  if (cache_layer) {
    exp->cache_status = [cache_layer](ByteRange r, ExtentList& out) { return cache_layer->cache_status(r, out); };
    exp->control = cache_layer;
    ctx.caches.push_back(cache_layer);
  }
  return exp;
}

void log_stats(spdlog::logger& log, const Export& exp) {
  const auto s = exp.device->stats().snapshot();
  log.info("export '{}': {} reads ({} bytes), {} writes ({} bytes), {} flushes, {} trims, {} zeroes, "
           "{} block-status, {} prefetches, {} errors",
           exp.name, s.reads, s.bytes_read, s.writes, s.bytes_written, s.flushes, s.trims, s.zeroes,
           s.block_status, s.prefetches, s.errors);
}

// Exports added and removed at run time through the control socket
// (export-add, export-remove), persisted in the catalogue's runtime_exports
// table and opened again at start.
//
// Thread model: the handlers run on event loop 0; one add or remove at a time
// (lock_), which also serialises every use of the OpenContext after start-up.
// Opening an export may block (connecting to a remote, creating a cache
// file), so it runs on the blocking pool.
//
// Removing an export that clients are connected to is refused (EBUSY) unless
// forced; forced, the export leaves the table at once (no new client can open
// it) and the sessions that hold it keep working until they disconnect, after
// which it is closed (its cache persisted) like at shutdown.
class RuntimeExports {
 public:
  RuntimeExports(OpenContext& ctx, ExportTable& exports, EventLoops& loops)
      : ctx_(ctx), exports_(exports), loops_(loops), log_(logger("control")) {}

  // Opens the exports saved by earlier export-add commands. One that cannot
  // be opened is logged and skipped (and kept in the catalogue: its remote
  // may come back); a name the configuration also defines is the
  // configuration's.
  void open_saved() {
    if (!std::filesystem::exists(ctx_.data_dir + "/catalogue.db")) return;
    for (const auto& saved : ctx_.open_catalogue().runtime_exports()) {
      if (exports_.find(saved.name) && !saved.name.empty()) {
        log_->warn("export '{}' added at run time is also defined in the configuration: serving the "
                   "configuration's ({})", saved.name, exports_.find(saved.name)->uri);
        continue;
      }
      try {
        auto exp = open_export(parse(saved.name, saved.uri, saved.options), ctx_);
        log_->info("export '{}': {} ({} bytes, added at run time)", exp->name, exp->device->describe(),
                   exp->device->geometry().size);
        exports_.add(std::move(exp));
        std::lock_guard lock(names_mutex_);
        runtime_names_.insert(saved.name);
      } catch (const std::exception& e) {
        log_->error("export '{}' added at run time cannot be opened, skipped (blockway status shows it; "
                    "blockway export remove drops it): {}", saved.name, e.what());
        std::lock_guard lock(names_mutex_);
        failed_[saved.name] = Failed{saved.uri, saved.options, e.what()};
      }
    }
  }

  // The saved exports that failed to open, for status, list and stats.
  Json failed_json() const {
    Json list = Json::array();
    std::lock_guard lock(names_mutex_);
    for (const auto& [name, f] : failed_) {
      Json e;
      e["name"] = name;
      e["uri"] = f.uri;
      e["options"] = f.options;
      e["state"] = "failed: " + f.reason;
      e["error"] = f.reason;
      e["mode"] = "failed";
      e["clients"] = 0;
      list.push_back(std::move(e));
    }
    return list;
  }

  // Saves a run-time change (hook of the "mode" and "prefetch-rate"
  // commands): into the saved options of an export added at run time, else
  // as a run-time setting over the configuration's value.
  Task<std::string> persist(std::shared_ptr<Export> exp, std::string key, std::string value) {
    const std::string name = exp->name;
    bool runtime = false;
    {
      std::lock_guard lock(names_mutex_);
      runtime = runtime_names_.contains(name);
    }
    std::string config_value;
    {
      std::lock_guard lock(ctx_.configured_mutex);
      auto it = ctx_.configured.find(name);
      if (it != ctx_.configured.end() && it->second.contains(key)) config_value = it->second.at(key);
    }
    cache::MetaStore* store = ctx_.catalogue.get();  // open: the export has a cache
    auto save = [this, store, exp, name, key, value, runtime, config_value]() -> std::string {
      if (!store) return "not saved: no catalogue";
      std::lock_guard saving(settings_mutex_);
      // Removed meanwhile (export-remove forgot its settings), perhaps with a
      // new export added under its name: nothing of this one to save.
      if (exports_.find(name) != exp) return {};
      try {
        if (runtime) {
          for (const auto& e : store->runtime_exports())
            if (e.name == name) store->update_runtime_export_options(name, with_option(e.options, key, value));
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

  void set_shutting_down() { shutting_down_ = true; }

  Task<Json> add(const Json& req) {
    const auto name = arg_string(req, "name");
    const auto uri = arg_string(req, "uri");
    const auto options = req.contains("options") ? arg_string(req, "options") : std::string();
    ExportConfig cfg = parse(name, uri, options);  // ConfigError: bad-request
    auto guard = co_await lock_.lock();
    if (shutting_down_) throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
    if (exports_.find(name)) throw ControlError("refused", EEXIST, "export '" + name + "' already exists");
    struct Opened {
      std::shared_ptr<Export> exp;
      std::vector<cache::CacheLayer*> caches;
      std::string error;
    };
    auto open = [this, cfg, options]() -> Opened {
      Opened o;
      const size_t caches_before = ctx_.caches.size();
      try {
        o.exp = open_export(cfg, ctx_);
        o.caches.assign(ctx_.caches.begin() + static_cast<long>(caches_before), ctx_.caches.end());
        if (!shutting_down_) ctx_.open_catalogue().save_runtime_export({cfg.name, cfg.uri, options});
      } catch (const std::exception& e) {
        o.error = e.what();
      }
      ctx_.caches.resize(caches_before);  // the start-up list; these start below
      return o;
    };
    Opened opened = co_await offload(loops_.blocking(), std::move(open));
    if (!opened.error.empty()) {
      if (opened.exp) co_await opened.exp->device->close();
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
          ctx_.open_catalogue().remove_runtime_export(name);
          return true;
        } catch (const std::exception&) {
          return false;
        }
      });
      if (!co_await std::move(forget)) log_->warn("export '{}': could not forget it in the catalogue", name);
      co_await opened.exp->device->close();
      throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
    }
    for (auto* c : opened.caches) c->start();
    exports_.add(opened.exp);
    {
      std::lock_guard lock(names_mutex_);
      runtime_names_.insert(name);
      failed_.erase(name);  // added again: the saved entry was replaced
    }
    log_->info("export '{}': {} ({} bytes) added at run time", name, opened.exp->device->describe(),
               opened.exp->device->geometry().size);
    co_return export_json(*opened.exp, 0);
  }

  Task<Json> remove(const Json& req) {
    const auto name = arg_string(req, "name");
    const bool force = arg_bool(req, "force", false);
    auto guard = co_await lock_.lock();
    auto exp = name.empty() ? nullptr : exports_.find(name);
    if (!exp) {
      auto removing = remove_failed(name);
      co_return co_await std::move(removing);
    }
    const long clients = export_clients(exp);
    if (clients > 0 && !force)
      throw ControlError("refused", EBUSY,
                         "export '" + name + "' has " + std::to_string(clients) +
                             " client connection(s); disconnect them first, or force: existing "
                             "connections keep it until they close, new ones cannot open it");
    exports_.remove(name);
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
        if (!std::filesystem::exists(ctx_.data_dir + "/catalogue.db")) return 0;
        auto& store = ctx_.open_catalogue();
        std::lock_guard saving(settings_mutex_);
        const size_t settings = store.forget_runtime_settings(name);
        if (settings) log_->info("export '{}': its {} run-time setting(s) are forgotten", name, settings);
        return store.remove_runtime_export(name) ? 1 : 0;
      } catch (const std::exception& e) {
        log_->error("export '{}': the catalogue could not be updated: {}", name, e.what());
        return -1;
      }
    };
    const int forgotten = co_await offload(loops_.blocking(), std::move(forget));
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

 private:
  struct Failed {
    std::string uri, options, reason;
  };

  // export-remove of a saved export that failed to open: forget it.
  Task<Json> remove_failed(std::string name) {
    std::optional<Failed> failed;
    {
      std::lock_guard lock(names_mutex_);
      if (auto it = failed_.find(name); it != failed_.end()) failed = it->second;
    }
    if (!failed) throw ControlError("unknown-export", ENOENT, "no export named '" + name + "'");
    cache::MetaStore* store = ctx_.catalogue.get();  // open: open_saved() read it
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
    out["message"] = "export '" + name + "' (which failed to open: " + failed->reason +
                     ") removed; it is forgotten in the catalogue";
    log_->info("{}", out["message"].get<std::string>());
    co_return out;
  }

  // "ro,cache=/c,mode=writeback" with key=value set (replaced or appended).
  static std::string with_option(const std::string& options, const std::string& key, const std::string& value) {
    std::string out;
    bool replaced = false;
    size_t pos = 0;
    while (pos <= options.size() && !options.empty()) {
      const size_t comma = std::min(options.find(',', pos), options.size());
      std::string item = options.substr(pos, comma - pos);
      if (item.substr(0, item.find('=')) == key) {
        if (replaced) item.clear();  // a repeated key: keep one
        else item = key + "=" + value;
        replaced = true;
      }
      if (!item.empty()) out += (out.empty() ? "" : ",") + item;
      pos = comma + 1;
    }
    if (!replaced) out += (out.empty() ? "" : ",") + key + "=" + value;
    return out;
  }

  static ExportConfig parse(const std::string& name, const std::string& uri, const std::string& options) {
    if (name.find(',') != std::string::npos || name.find('=') != std::string::npos)
      throw ConfigError("export name '" + name + "' must not contain ',' or '='");
    if (uri.find(',') != std::string::npos)
      throw ConfigError("the URI must not contain ',' (options go in \"options\")");
    return ExportConfig::parse_spec(name + "=" + uri + (options.empty() ? "" : "," + options));
  }

  // Waits until nothing holds `exp` any more (sessions, a FUSE node), then
  // closes it as shutdown would.
  static Task<void> close_when_unused(std::shared_ptr<Export> exp) {
    boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor);
    while (exp.use_count() > 1) {
      timer.expires_after(std::chrono::milliseconds(100));
      co_await timer.async_wait(boost::asio::use_awaitable);
    }
    co_await exp->device->close();
  }

  OpenContext& ctx_;
  ExportTable& exports_;
  EventLoops& loops_;
  std::shared_ptr<spdlog::logger> log_;
  AsyncMutex lock_;
  // Held (on the blocking pool) while a run-time setting is saved or an
  // export's saved entry and settings are forgotten: a save is a
  // read-modify-write of a run-time export's options, and one that loses the
  // race with export-remove must find the export gone, not save it again.
  std::mutex settings_mutex_;
  std::atomic<bool> shutting_down_{false};
  // Names of the exports this class opened (run-time ones), and the saved
  // ones that failed to open; read by the control plane's hooks.
  mutable std::mutex names_mutex_;
  std::set<std::string> runtime_names_;
  std::map<std::string, Failed> failed_;
};

// `blockway mount DIR`: mount(2), and a statfs of whatever is already at DIR
// (a stale mount can take a while to answer), run on the blocking pool, not
// on the control plane's event loop.
Task<Json> fuse_mount_command(fuse::FuseFrontEnd& fuse, boost::asio::thread_pool& pool,
                              const std::atomic<bool>& stopping, Json request) {
  const std::string dir = arg_string(request, "dir");
  if (dir.empty() || dir.front() != '/')
    throw ControlError("bad-request", EINVAL, "mount: dir must be an absolute path, not '" + dir + "'");
  if (stopping.load()) throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
  if (fuse.active()) throw ControlError("refused", EBUSY, "the exports are already mounted at " + fuse.mountpoint());
  auto mounting = offload(pool, [&fuse, dir]() -> std::string {
    try {
      fuse.mount(dir);
      return {};
    } catch (const std::exception& e) {
      return e.what();
    }
  });
  const std::string error = co_await std::move(mounting);
  if (!error.empty()) throw ControlError("failed", EIO, error);
  if (stopping.load()) {
    // SIGTERM came while mount(2) ran: its unmount() found nothing to do, and
    // a mount left behind would keep the daemon from ever finishing the drain.
    fuse.unmount();
    throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
  }
  co_return Json{{"mountpoint", fuse.mountpoint()}};
}

Task<Json> fuse_unmount_command(fuse::FuseFrontEnd& fuse) {
  if (!fuse.active()) throw ControlError("refused", EINVAL, "the exports are not mounted");
  const std::string where = fuse.mountpoint();
  fuse.unmount();
  co_return Json{{"mountpoint", where}};
}

}  // namespace

int run_daemon(DaemonConfig config) {
  auto log = logger("daemon");
  if (config.data_dir.empty()) config.data_dir = default_data_dir();
  if (config.embedded_default) {
    config.exports.push_back(demo_export(config.data_dir));
    if (config.listen.empty()) {
      config.listen.push_back(ListenAddress::parse("127.0.0.1:10809"));
      config.listen.push_back(ListenAddress::parse("[::1]:10809"));
    }
  }
  if (config.listen.empty() && !config.stdio_export)
    config.listen.push_back(ListenAddress::parse("127.0.0.1:10809"));
  config.validate();
  // Checked before anything starts; a [fuse] table without a mountpoint
  // only sets the options of a mount made later at run time.
  auto fuse_options = fuse::FuseOptions::parse(config.fuse ? config.fuse->options : std::map<std::string, std::string>{});
  fuse_options.shutdown_timeout = config.shutdown_timeout;

  std::signal(SIGPIPE, SIG_IGN);  // a vanished client is an error code, not a signal
  EventLoops loops(config.threads, config.blocking_threads);
  ExportTable exports;
  std::vector<ExportConfig> all = config.exports;
  if (config.stdio_export) all.push_back(*config.stdio_export);
  OpenContext open_ctx{loops, config.data_dir, nullptr};
  for (auto& e : all) {
    auto exp = open_export(e, open_ctx);
    const auto geo = exp->device->geometry();
    log->info("export '{}': {} ({} bytes{})", exp->name, exp->device->describe(), geo.size,
              exp->device->capabilities().read_only ? ", read-only" : "");
    exports.add(std::move(exp));
  }
  RuntimeExports runtime_exports(open_ctx, exports, loops);
  runtime_exports.open_saved();
  exports.set_default(config.default_export);
  for (auto* c : open_ctx.caches) c->start();
  open_ctx.caches.clear();

  // The control plane: the dispatch table, then its socket (after the NBD
  // sockets, below). Adding a command is one add() here or in
  // add_export_commands().
  ControlDispatcher control_commands;
  ExportCommandHooks hooks;
  hooks.persist = [&runtime_exports](std::shared_ptr<Export> exp, std::string key, std::string value) {
    return runtime_exports.persist(std::move(exp), std::move(key), std::move(value));
  };
  hooks.failed_exports = [&runtime_exports] { return runtime_exports.failed_json(); };
  add_export_commands(control_commands, exports, std::move(hooks));
  control_commands.add("export-add", "add an export and save it in the catalogue {name, uri, options?}",
                       [&runtime_exports](const Json& req) { return runtime_exports.add(req); });
  control_commands.add("export-remove", "remove an export {name, force?}",
                       [&runtime_exports](const Json& req) { return runtime_exports.remove(req); });
  ControlServer control(loops.at(0), control_commands);
  auto stop_control = [&] {
    runtime_exports.set_shutting_down();
    control.stop();
  };

  nbd::ServerOptions sopts;
  sopts.limits.max_request_bytes = config.max_request_bytes;
  sopts.limits.max_inflight_bytes = config.max_inflight_bytes;
  sopts.handshake_timeout = config.handshake_timeout;
  sopts.shutdown_timeout = config.shutdown_timeout;
  nbd::Server server(loops, exports, sopts);

  boost::asio::signal_set signals(loops.at(0), SIGINT, SIGTERM);
  // The FUSE front end: mounted below if configured; a control command can
  // mount() and unmount() it at run time.
  auto fuse_front = std::make_unique<fuse::FuseFrontEnd>(loops, exports, fuse_options);
  // Exports close once every front end is done with them: the NBD server has
  // drained and the FUSE mount is gone. Touched on loop 0 only.
  bool server_drained = false;
  bool closing = false;
  auto close_exports_when_idle = [&] {
    boost::asio::post(loops.at(0), [&] {
      if (closing || !server_drained || fuse_front->active()) return;
      closing = true;
      stop_control();
      // Let each export stop its background work and persist its state, then
      // let the loops run out of work.
      boost::asio::co_spawn(
          loops.at(0),
          [&]() -> Task<void> {
            for (const auto& exp : exports.list()) co_await exp->device->close();
          },
          [&](std::exception_ptr e) {
            if (e) log->error("closing the exports failed");
            boost::system::error_code ignored;
            signals.cancel(ignored);
            loops.release();
          });
    });
  };
  server.set_on_drained([&] {
    boost::asio::post(loops.at(0), [&] {
      server_drained = true;
      fuse_front->unmount();  // --stdio: the client left
      close_exports_when_idle();
    });
  });
  fuse_front->set_on_unmounted(close_exports_when_idle);
  std::atomic<bool> stopping{false};  // set by SIGTERM/SIGINT
  control_commands.add("mount", "mount the FUSE front end: every export as a file in {dir}",
                       [&fuse_front, &loops, &stopping](const Json& req) {
                         return fuse_mount_command(*fuse_front, loops.blocking(), stopping, req);
                       });
  control_commands.add("unmount", "unmount the FUSE front end",
                       [&fuse_front](const Json&) { return fuse_unmount_command(*fuse_front); });

  if (config.stdio_export) {
    server.serve_stdio();
  }
  for (const auto& addr : config.listen) {
    try {
      for (const auto& b : server.listen(addr)) log->info("listening on {}", b);
    } catch (const std::runtime_error& e) {
      throw ConfigError(e.what());
    }
  }

  if (config.control_socket != "off") {
    const bool explicit_path = !config.control_socket.empty();
    const std::string path = explicit_path ? config.control_socket : default_control_socket();
    try {
      if (!explicit_path && ControlServer::is_live(path))
        throw std::runtime_error("control socket " + path + ": another daemon is listening there");
      const gid_t group = config.control_socket_group.empty()
                              ? static_cast<gid_t>(-1)
                              : static_cast<gid_t>(control_group_id(config.control_socket_group));
      control.listen(path, static_cast<mode_t>(config.control_mode()), group);
      log->info("control socket {}", path);
    } catch (const std::runtime_error& e) {
      if (explicit_path) throw ConfigError(e.what());
      // The default path is shared by every daemon on the machine: a second
      // one still serves its exports, without a control socket.
      log->warn("{}; running without a control socket (set --control-socket or [control] socket)", e.what());
    }
  }

  std::function<void(const boost::system::error_code&, int)> on_signal =
      [&](const boost::system::error_code& ec, int sig) {
        if (ec) return;
        log->info("received {}, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
        stopping = true;
        server.shutdown();
        fuse_front->unmount();
        signals.async_wait(on_signal);
      };
  signals.async_wait(on_signal);

  if (config.fuse && !config.fuse->mountpoint.empty()) {
    try {
      fuse_front->mount(config.fuse->mountpoint);
    } catch (const std::runtime_error& e) {
      throw ConfigError(e.what());
    }
  }

  if (!config.pid_file.empty()) {
    // Written after every socket listens: its presence means "ready".
    const std::string tmp = config.pid_file + ".tmp";
    std::ofstream(tmp) << ::getpid() << "\n";
    std::filesystem::rename(tmp, config.pid_file);
  }

  loops.run();
  for (const auto& exp : exports.list()) log_stats(*log, *exp);
  if (!config.pid_file.empty()) ::unlink(config.pid_file.c_str());
  log->info("stopped");
  return 0;
}

}  // namespace blockway::gateway
