#include "gateway/stack_builder.hpp"

#include "cache/overlay_config.hpp"
#include "cache/overlay_layer.hpp"
#include "core/checked_device.hpp"
#include "core/logging.hpp"
#include "core/options.hpp"
#include "core/retry_layer.hpp"
#include "remote/registry.hpp"

#include <algorithm>
#include <charconv>
#include <filesystem>

namespace blockway::gateway {

using core::BlockDevice;
using core::ByteRange;
using core::CheckedDevice;
using core::ConfigError;
using core::Export;
using core::ExtentList;
using core::RetryLayer;
using core::RetryOptions;

StackBuilder::StackBuilder(core::EventLoops& loops, std::string data_dir)
    : loops_(loops), data_dir_(std::move(data_dir)) {}

cache::MetaStore& StackBuilder::catalogue() {
  if (!catalogue_) {
    std::error_code ec;
    std::filesystem::create_directories(data_dir_, ec);
    if (ec) throw ConfigError("cannot create data directory " + data_dir_ + ": " + ec.message());
    try {
      catalogue_ = std::make_unique<cache::MetaStore>(data_dir_ + "/catalogue.db");
    } catch (const std::runtime_error& e) {
      throw ConfigError(e.what());
    }
  }
  return *catalogue_;
}

void StackBuilder::set_remote_bandwidth(uint64_t bytes_per_second) {
  remote_bandwidth_ = bytes_per_second == 0 ? nullptr
                                            : std::make_shared<core::RemoteBandwidth>(bytes_per_second,
                                                                                      loops_.at(0).get_executor());
}

bool StackBuilder::catalogue_exists() const { return std::filesystem::exists(data_dir_ + "/catalogue.db"); }

std::string StackBuilder::configured_value(const std::string& name, const std::string& key) const {
  std::lock_guard lock(configured_mutex_);
  auto it = configured_.find(name);
  if (it == configured_.end()) return {};
  auto value = it->second.find(key);
  return value == it->second.end() ? std::string() : value->second;
}

StackBuilder::Built StackBuilder::build(ExportConfig cfg) {
  core::Options options(cfg.options, "export '" + cfg.name + "'");
  auto qos = core::QosLimits::take_from(options);
  apply_runtime_qos(cfg.name, qos);
  auto cache_cfg = cache::CacheConfig::take_from(options);
  const auto clone_base = cache::clone_base_of(cfg.uri);
  if (clone_base && cache_cfg)
    throw ConfigError("export '" + cfg.name + "': a clone has no cache of its own (cache=): it reads through its "
                      "base's cache");
  if (!clone_base && cache::OverlayConfig::given(options))
    throw ConfigError("export '" + cfg.name + "': overlay options (overlay=, granularity=) are for clones "
                      "(clone:BASE)");
  if (cache_cfg) apply_runtime_settings(cfg.name, *cache_cfg);
  if (!cache_cfg) refuse_without_its_cache(cfg);
  auto exp = std::make_shared<Export>();
  // The remote, and a RetryLayer above it when the registry says its
  // session can be lost.
  const remote::OpenEnv env{cfg.read_only, &loops_.blocking(), &loops_};
  std::unique_ptr<BlockDevice> device;
  RetryLayer* retry_layer = nullptr;  // owned by the device chain, like the cache
  core::RemoteDevice* remote = nullptr;  // likewise
  cache::OverlayLayer* overlay = nullptr;  // likewise
  if (clone_base) device = open_clone(cfg, *clone_base, options, *exp, overlay);
  try {
    const remote::Backend* backend = clone_base ? nullptr : &remote::backend_for(cfg.uri);
    // A detached export (local mode) never opens its remote again.
    if (backend && cache_cfg) device = open_detached(cfg, *backend, options);
    if (backend && !device && backend->open_local) device = backend->open_local(cfg.uri, options, env);
    if (backend && !device && backend->open_remote) {
      // A network session can drop: reconnect and retry right above the remote.
      const RetryOptions retry = RetryOptions::take_from(options);
      auto opened = backend->open_remote(cfg.uri, options, env);
      remote = opened.get();
      auto layer = std::make_unique<RetryLayer>(std::move(opened), retry);
      retry_layer = layer.get();
      device = std::move(layer);
      if (remote_bandwidth_)
        device = std::make_unique<core::RemoteBandwidthLayer>(std::move(device), remote_bandwidth_);
    }
  } catch (const remote::BackendError& e) {
    throw ConfigError("export '" + cfg.name + "': " + e.what());
  }
  options.finish();
  exp->name = cfg.name;
  exp->description = cfg.description;
  exp->tls_required = cfg.tls_required;
  exp->file_attrs.store(file_attrs(cfg));
  exp->access.store(access_policy(cfg));
  exp->uri = cfg.uri;
  cache::CacheLayer* cache_layer = nullptr;
  if (cache_cfg) {
    cache::CacheLayer::Params params;
    params.export_name = cfg.name;
    params.remote_uri = cfg.uri;
    params.config = *cache_cfg;
    params.store = &catalogue();
    params.blocking = &loops_.blocking();
    params.background = loops_.at(0).get_executor();
    if (retry_layer) params.remote_bandwidth = remote_bandwidth_;
    try {
      auto layer = std::make_unique<cache::CacheLayer>(std::move(device), std::move(params));
      cache_layer = layer.get();
      device = std::move(layer);
    } catch (const std::runtime_error& e) {
      throw ConfigError("export '" + cfg.name + "': " + e.what());
    }
  }
  // QoS above the cache: cache hits are limited too, as the tenant sees them.
  auto qos_layer = std::make_unique<core::QosLayer>(std::move(device), qos);
  exp->qos = qos_layer.get();
  exp->device = std::make_shared<CheckedDevice>(std::move(qos_layer), cfg.read_only);
  if (retry_layer) exp->remote_health = [retry_layer] { return retry_layer->health(); };
  if (remote) remote->set_resize_handler(resize_handler(cfg.name, exp->device, cache_layer != nullptr));
  if (cache_layer) {
    exp->cache_status = [cache_layer](ByteRange r, ExtentList& out) { return cache_layer->cache_status(r, out); };
    exp->control = cache_layer;
  }
  if (overlay) {
    {
      std::lock_guard lock(clones_mutex_);
      clones_[cfg.name] = {exp, overlay};
    }
    overlay->start();  // resumes a flatten that was running
  }
  return {exp, cache_layer};
}

core::RemoteDevice::ResizeHandler StackBuilder::resize_handler(const std::string& name,
                                                              const std::shared_ptr<CheckedDevice>& device,
                                                              bool cached) {
  // A cache's file, block maps and catalogue record are sized when the
  // export opens and read without locks on every request: they cannot grow
  // under it. When the export opens again, the cache grows with the image
  // and keeps what it holds (CacheLayer::grow_cache). An uncached export only
  // has its bounds check to move.
  if (cached)
    return [name](uint64_t, uint64_t) {
      return "export '" + name + "' has a cache, whose file and block maps cannot grow while served; re-add the "
             "export (blockway export remove/add) or restart the daemon to serve the new size (the cache grows "
             "with it and keeps its data, dirty data too)";
    };
  return [weak = std::weak_ptr<CheckedDevice>(device)](uint64_t, uint64_t new_size) {
    if (auto d = weak.lock()) d->grow(new_size);
    return std::string();
  };
}

core::SnapshotControl* StackBuilder::snapshots_of(const std::shared_ptr<Export>& exp) const {
  std::lock_guard lock(clones_mutex_);
  auto it = clones_.find(exp->name);
  if (it == clones_.end() || it->second.first.lock() != exp) return nullptr;
  return it->second.second;
}

// A clone reads what it never wrote through its base export's whole stack
// (its CheckedDevice: the base's QoS, cache and prefetch), so every clone
// shares the base's one cache and one fetch per block.
std::unique_ptr<BlockDevice> StackBuilder::open_clone(const ExportConfig& cfg, const std::string& base_name,
                                                      core::Options& options, Export& exp,
                                                      cache::OverlayLayer*& overlay_layer) {
  const std::string what = "export '" + cfg.name + "'";
  if (base_name.empty()) throw ConfigError(what + ": clone: needs the name of its base export (clone:BASE)");
  if (base_name == cfg.name) throw ConfigError(what + " cannot be a clone of itself");
  auto base = find_export_ ? find_export_(base_name) : nullptr;
  if (base && base->name != base_name) base = nullptr;
  bool flattened = false;
  try {
    flattened = !base && cache::OverlayLayer::flattened_in(catalogue(), cfg.name);
  } catch (const std::runtime_error& e) {
    throw ConfigError(what + ": " + e.what());
  }
  // A flattened clone holds every block itself: it opens without its base.
  if (!base && !flattened)
    throw ConfigError(what + ": its base export '" + base_name +
                      "' does not exist (define or add the base before its clones)");
  auto overlay = cache::OverlayConfig::take_from(options, std::filesystem::absolute(data_dir_ + "/overlays").string());
  cache::OverlayLayer::Params p;
  p.export_name = cfg.name;
  p.base_name = base_name;
  p.config = overlay;
  p.store = &catalogue();
  p.blocking = &loops_.blocking();
  p.background = loops_.at(0).get_executor();
  std::unique_ptr<cache::OverlayLayer> layer;
  try {
    layer = std::make_unique<cache::OverlayLayer>(base ? base->device : nullptr, std::move(p));
  } catch (const std::runtime_error& e) {
    throw ConfigError(what + ": " + e.what());
  }
  exp.clone_of = base_name;
  exp.overlay_path = layer->overlay_path();
  overlay_layer = layer.get();
  exp.overlay_counters = [o = layer.get()] {
    const auto s = o->stats();
    return std::vector<std::pair<std::string, uint64_t>>{
        {"granularity", s.granularity},     {"allocated_bytes", s.allocated_bytes},
        {"file_bytes", s.file_bytes},       {"base_reads", s.base_reads},
        {"base_read_bytes", s.base_read_bytes}, {"overlay_reads", s.overlay_reads},
        {"overlay_read_bytes", s.overlay_read_bytes}, {"copy_ups", s.copy_ups},
        {"copy_up_bytes", s.copy_up_bytes}, {"commits", s.commits},
        {"recovered", s.recovered ? 1u : 0u}, {"snapshots", s.snapshots},
        {"snapshot_bytes", s.snapshot_bytes},
        // Folded into "flatten": {...} by the status report (control_protocol.cpp).
        {"flatten_state", static_cast<uint64_t>(s.flatten.state)}, {"flatten_done_bytes", s.flatten.done_bytes},
        {"flatten_total_bytes", s.flatten.total_bytes}, {"flatten_rate", s.flatten.rate},
        {"flatten_copied_bytes", s.flatten.copied_bytes}};
  };
  return layer;
}

// The stand-in remote of an export detached in an earlier run, or nullptr.
// The backend and retry options are still checked (and taken).
std::unique_ptr<BlockDevice> StackBuilder::open_detached(const ExportConfig& cfg, const remote::Backend& backend,
                                                        core::Options& options) {
  std::unique_ptr<BlockDevice> device;
  try {
    device = cache::open_if_detached(catalogue(), cfg.name, cfg.uri);
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
void StackBuilder::apply_runtime_settings(const std::string& name, cache::CacheConfig& c) {
  const std::string config_mode = cache::to_string(c.mode);
  const std::string config_rate = std::to_string(c.prefetch_rate);
  {
    std::lock_guard lock(configured_mutex_);
    configured_[name]["mode"] = config_mode;
    configured_[name]["prefetch-rate"] = config_rate;
  }
  auto log = core::logger("daemon");
  auto& store = catalogue();
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

// A run-time QoS change (blockway qos) is saved like the write mode: as the
// limits in export-option form with the configuration's limits then, and it
// applies while the configuration still says the same. Any export may have
// one, so the catalogue is read only if it exists (never made for this).
void StackBuilder::apply_runtime_qos(const std::string& name, core::QosLimits& q) {
  const std::string config_value = q.to_options();
  {
    std::lock_guard lock(configured_mutex_);
    configured_[name]["qos"] = config_value;
  }
  if (!catalogue_exists()) return;
  auto log = core::logger("daemon");
  auto& store = catalogue();
  try {
    for (const auto& s : store.runtime_settings(name)) {
      if (s.key != "qos") continue;
      if (s.config_value != config_value) {
        log->info("export '{}': the configuration's QoS limits changed since they were set at run time: "
                  "the configuration's apply ({})", name, config_value);
        store.forget_runtime_setting(name, s.key);
        continue;
      }
      q = core::QosLimits::from_options(s.value, "export '" + name + "': saved QoS");
      log->info("export '{}': QoS {} (set at run time; the configuration says {})", name, s.value, config_value);
    }
  } catch (const std::runtime_error& e) {
    throw ConfigError("export '" + name + "': " + e.what());
  }
}

std::optional<std::string> StackBuilder::runtime_value(const std::string& name, const std::string& key,
                                                       const std::string& config_value, std::string_view what) {
  {
    std::lock_guard lock(configured_mutex_);
    configured_[name][key] = config_value;
  }
  if (!catalogue_exists()) return std::nullopt;
  auto& store = catalogue();
  std::optional<std::string> value;
  try {
    for (const auto& s : store.runtime_settings(name)) {
      if (s.key != key) continue;
      if (s.config_value != config_value) {
        core::logger("daemon")->info("export '{}': the configuration's {} changed since they were set at run "
                                     "time: the configuration's apply", name, what);
        store.forget_runtime_setting(name, s.key);
        continue;
      }
      value = s.value;
    }
  } catch (const std::runtime_error& e) {
    throw ConfigError("export '" + name + "': " + e.what());
  }
  return value;
}

std::shared_ptr<const core::AccessPolicy> StackBuilder::access_policy(const ExportConfig& cfg) {
  auto policy = core::AccessPolicy::parse(cfg.allow, cfg.listen_on);
  if (auto saved = runtime_value(cfg.name, "access", policy.saved(), "access rules")) {
    try {
      policy = core::AccessPolicy::from_saved(*saved);
    } catch (const std::runtime_error& e) {
      throw ConfigError("export '" + cfg.name + "': " + e.what());
    }
    core::logger("daemon")->info("export '{}': allow '{}', listen '{}' (set at run time)", cfg.name,
                                 policy.allow_text(), policy.listen_text());
  }
  if (policy.open()) return nullptr;
  return std::make_shared<const core::AccessPolicy>(std::move(policy));
}

// fuse-uid=, fuse-gid=, fuse-mode=, or what `blockway access` set at run
// time while the configuration still says what it said then.
std::shared_ptr<const core::FileAttrs> StackBuilder::file_attrs(const ExportConfig& cfg) {
  auto attrs = cfg.fuse;
  if (auto saved = runtime_value(cfg.name, "fuse", saved_fuse_attrs(cfg.fuse), "FUSE owner and mode")) {
    attrs = fuse_attrs_from_saved(cfg.name, *saved);
    core::logger("daemon")->info("export '{}': FUSE file {} (set at run time; the configuration says {})", cfg.name,
                                 *saved, saved_fuse_attrs(cfg.fuse));
  }
  if (attrs == core::FileAttrs{}) return nullptr;
  return std::make_shared<const core::FileAttrs>(attrs);
}

// Serving an export without the cache that still holds its unwritten data
// would silently show clients old bytes.
void StackBuilder::refuse_without_its_cache(const ExportConfig& cfg) {
  if (!catalogue_exists()) return;
  auto& store = catalogue();
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

}  // namespace blockway::gateway
