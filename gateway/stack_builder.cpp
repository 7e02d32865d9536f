#include "gateway/stack_builder.hpp"

#include "cache/overlay_config.hpp"
#include "cache/overlay_layer.hpp"
#include "core/checked_device.hpp"
#include "core/logging.hpp"
#include "core/options.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>

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

StackBuilder::StackBuilder(core::EventLoops& loops, std::string data_dir)
    : loops_(loops), data_dir_(std::move(data_dir)) {}

cache::MetaStore& StackBuilder::catalogue() {
  if (!catalogue_) catalogue_ = stack::open_catalogue(data_dir_);
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
  const stack::ExportSpec spec{cfg.name, cfg.uri, cfg.read_only};
  core::Options options(cfg.options, spec.where());
  auto layers = stack::LayerOptions::take_from(options);
  apply_runtime_qos(cfg.name, layers.qos);
  const auto clone_base = cache::clone_base_of(cfg.uri);
  if (clone_base && layers.cache)
    throw ConfigError("export '" + cfg.name + "': a clone has no cache of its own (cache=): it reads through its "
                      "base's cache");
  if (!clone_base && cache::OverlayConfig::given(options))
    throw ConfigError("export '" + cfg.name + "': overlay options (overlay=, granularity=) are for clones "
                      "(clone:BASE)");
  if (layers.cache) apply_runtime_settings(cfg.name, *layers.cache);
  if (!layers.cache) refuse_without_its_cache(cfg);
  auto exp = std::make_shared<Export>();
  const auto ctx = context();
  // The bottom: a clone's overlay on its base export, else the shared stack's
  // (the remote, or a detached export's stand-in).
  stack::Bottom bottom;
  cache::OverlayLayer* overlay = nullptr;  // owned by the device chain, like the cache
  if (clone_base) bottom.device = open_clone(cfg, *clone_base, options, *exp, overlay);
  else bottom = stack::open_bottom(spec, layers.cache.has_value(), options, ctx);
  options.finish();
  exp->name = cfg.name;
  exp->description = cfg.description;
  exp->tls_required = cfg.tls_required;
  exp->file_attrs.store(file_attrs(cfg));
  exp->access.store(access_policy(cfg));
  exp->uri = cfg.uri;
  auto built = stack::add_layers(spec, std::move(bottom), layers, ctx);
  exp->qos = built.qos;
  exp->device = std::move(built.device);
  exp->follow_size = std::move(built.follow_size);
  if (auto* retry_layer = built.retry) exp->remote_health = [retry_layer] { return retry_layer->health(); };
  if (built.remote) built.remote->set_resize_handler(resize_handler(cfg.name, exp->device, built.cache));
  if (auto* cache_layer = built.cache) {
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
  return {exp, built.cache};
}

stack::Context StackBuilder::context() {
  return {loops_, [this]() -> cache::MetaStore& { return catalogue(); }, remote_bandwidth_};
}

core::RemoteDevice::ResizeHandler StackBuilder::resize_handler(const std::string& name,
                                                              const std::shared_ptr<CheckedDevice>& device,
                                                              cache::CacheLayer* cache) {
  // An uncached export only has its bounds check to move. A cached one grows
  // its cache first (CacheLayer::grow_while_served: the file, the catalogue
  // record, the block maps, in place while requests go on), on the loop,
  // not on the backend's thread that calls this; its bounds move once that
  // is done. What the cache can tell at once that it would refuse is the
  // answer here (the backend then keeps the old size and reports why);
  // a later failure is logged, and the export keeps its size.
  if (cache)
    return [this, name, cache, weak = std::weak_ptr<CheckedDevice>(device)](uint64_t, uint64_t new_size) {
      // The device owns the stack, the cache too: hold it before the cache
      // is touched (an export removed while its remote reports a resize).
      auto d = weak.lock();
      if (!d) return std::string();
      if (auto why = cache->grow_refusal(new_size); !why.empty()) return "export '" + name + "': " + why;
      boost::asio::co_spawn(loops_.at(0).get_executor(), grow_cached(name, std::move(d), cache, new_size),
                            boost::asio::detached);
      return std::string();
    };
  return [this, name, weak = std::weak_ptr<CheckedDevice>(device)](uint64_t, uint64_t new_size) {
    if (auto d = weak.lock()) d->grow(new_size);
    note_clones_keep_size(name, new_size);
    return std::string();
  };
}

core::Task<void> StackBuilder::grow_cached(std::string name, std::shared_ptr<CheckedDevice> device,
                                           cache::CacheLayer* cache, uint64_t new_size) {
  // `device` owns the stack, the cache too: it lives until this ends.
  const std::string why = co_await cache->grow_while_served(new_size);
  if (!why.empty()) {
    core::logger("daemon")->error("export '{}': the remote grew to {} bytes, but the export keeps {} bytes: {}", name,
                                  new_size, device->geometry().size, why);
    co_return;
  }
  device->grow(new_size);
  note_clones_keep_size(name, new_size);
}

void StackBuilder::note_clones_keep_size(const std::string& base, uint64_t new_size) const {
  // A clone's overlay (its block map and file) is sized when the clone is
  // made and never changes: it keeps serving that size, reading its base
  // below it, and (OverlayLayer's open) refuses to open again over a base of
  // another size while it holds writes. Said at each grow, at warn, so
  // nobody expects the clone to follow.
  std::vector<std::string> names;
  {
    std::lock_guard lock(clones_mutex_);
    for (const auto& [clone, entry] : clones_)
      if (auto e = entry.first.lock(); e && e->clone_of == base) names.push_back(clone);
  }
  for (const auto& clone : names)
    core::logger("daemon")->warn("export '{}' is a clone of '{}', which grew to {} bytes: a clone keeps the size it "
                                 "was made with (and, holding writes, will not open again over the grown base: "
                                 "remove it and make it again to use the new size)",
                                 clone, base, new_size);
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
