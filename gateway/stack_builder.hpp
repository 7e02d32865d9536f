// StackBuilder: turns an export's configuration (URI + options) into the
// layer stack clients are served from. The stack itself (backend or a
// detached export's stand-in, RetryLayer, CacheLayer, QosLayer,
// CheckedDevice) is stack/export_stack.*, which the nbdkit plugin builds too;
// around it this adds what only the daemon has:
//
//   a clone (clone:BASE) as the bottom: the base export's device and an
//   OverlayLayer on it (no retry, bandwidth cap or cache of its own: the
//   base has them)
//   RemoteBandwidthLayer  above the RetryLayer, with --remote-bandwidth: the
//                         daemon-wide cap (passed in stack::Context)
//   run-time settings saved in the catalogue (write mode, prefetch rate, QoS,
//   access rules, FUSE file attributes), applied before the stack is built
//   the export's access policy and file attributes, its remote health, cache
//   control and what it does when its remote image changes size
//
// It also owns the catalogue (opened when the first cache, or a run-time
// export, needs it) and refuses an export whose cache holds data its remote
// lacks when the configuration no longer names that cache.
//
// Thread model: build() runs at start-up on the main thread, and later on the
// blocking pool for export-add (RuntimeExports serialises those), never two at
// once. configured_value() may be called from any thread.
#pragma once

#include "cache/cache_layer.hpp"
#include "cache/meta_store.hpp"
#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "core/remote_bandwidth.hpp"
#include "core/remote_device.hpp"
#include "core/snapshot_control.hpp"
#include "gateway/config.hpp"
#include "stack/export_stack.hpp"

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

namespace blockway::cache {
class OverlayLayer;
}

namespace blockway::gateway {

class StackBuilder {
 public:
  StackBuilder(core::EventLoops& loops, std::string data_dir);

  struct Built {
    std::shared_ptr<core::Export> exp;
    // The cache in the stack, if any: start() it once the export is served.
    cache::CacheLayer* cache = nullptr;
  };
  // Builds the stack of one export. Throws core::ConfigError naming the export.
  Built build(ExportConfig cfg);

  // How a clone finds its base export (the daemon's export table). Start-up only.
  void set_export_lookup(std::function<std::shared_ptr<core::Export>(const std::string&)> lookup) {
    find_export_ = std::move(lookup);
  }

  // The daemon-wide cap on remote bandwidth (0: none), for the exports built
  // after this call. Start-up only.
  void set_remote_bandwidth(uint64_t bytes_per_second);
  [[nodiscard]] const std::shared_ptr<core::RemoteBandwidth>& remote_bandwidth() const noexcept {
    return remote_bandwidth_;
  }

  // The catalogue, opened (and the data directory made) on first use.
  // Throws core::ConfigError.
  cache::MetaStore& catalogue();
  // The catalogue if it is open, else nullptr.
  [[nodiscard]] cache::MetaStore* open_catalogue_or_null() const noexcept { return catalogue_.get(); }
  // Whether a catalogue file exists in the data directory (without opening it).
  [[nodiscard]] bool catalogue_exists() const;

  // The value the configuration (or, for a run-time export, its saved
  // options) gave `key` ("mode", "prefetch-rate", "qos") of an export before
  // run-time changes: what a run-time change is recorded against. Empty if
  // unknown.
  [[nodiscard]] std::string configured_value(const std::string& name, const std::string& key) const;

  // The snapshots of `exp` if it is a clone this builder built (null for
  // other exports). Valid while the caller holds `exp`. Any thread.
  [[nodiscard]] core::SnapshotControl* snapshots_of(const std::shared_ptr<core::Export>& exp) const;

 private:
  // What the shared stack is built with: our loops, catalogue and bandwidth cap.
  stack::Context context();
  void apply_runtime_settings(const std::string& name, cache::CacheConfig& c);
  void apply_runtime_qos(const std::string& name, core::QosLimits& q);
  // allow= and listen= as the configuration says, or as `blockway access`
  // changed them (saved like the QoS limits). Null: no rules.
  std::shared_ptr<const core::AccessPolicy> access_policy(const ExportConfig& cfg);
  // fuse-uid=, fuse-gid=, fuse-mode= likewise. Null: none set.
  std::shared_ptr<const core::FileAttrs> file_attrs(const ExportConfig& cfg);
  // Records the configuration's value of a run-time setting (saved form) and
  // returns the one saved at run time while the configuration still says
  // that; a saved one the configuration has changed since is forgotten
  // (logged, naming `what`). Throws ConfigError.
  std::optional<std::string> runtime_value(const std::string& name, const std::string& key,
                                           const std::string& config_value, std::string_view what);
  void refuse_without_its_cache(const ExportConfig& cfg);
  // What the export does when its remote image grows: an uncached one grows
  // its bounds; a cached one grows its cache in place first (on the loop),
  // or says at once why it cannot. Clones of it keep their size (logged).
  core::RemoteDevice::ResizeHandler resize_handler(const std::string& name,
                                                   const std::shared_ptr<core::CheckedDevice>& device,
                                                   cache::CacheLayer* cache);
  core::Task<void> grow_cached(std::string name, std::shared_ptr<core::CheckedDevice> device,
                               cache::CacheLayer* cache, uint64_t new_size);
  void note_clones_keep_size(const std::string& base, uint64_t new_size) const;
  // The device of a clone: an OverlayLayer over its base export's device.
  std::unique_ptr<core::BlockDevice> open_clone(const ExportConfig& cfg, const std::string& base_name,
                                                core::Options& options, core::Export& exp,
                                                cache::OverlayLayer*& overlay);

  core::EventLoops& loops_;
  const std::string data_dir_;
  std::unique_ptr<cache::MetaStore> catalogue_;
  std::shared_ptr<core::RemoteBandwidth> remote_bandwidth_;
  std::function<std::shared_ptr<core::Export>(const std::string&)> find_export_;
  mutable std::mutex configured_mutex_;
  std::map<std::string, std::map<std::string, std::string>> configured_;
  // Clones by name: the export (to tell a newer one of the same name apart)
  // and its overlay's snapshots, which live as long as the export.
  mutable std::mutex clones_mutex_;
  std::map<std::string, std::pair<std::weak_ptr<core::Export>, core::SnapshotControl*>> clones_;
};

}  // namespace blockway::gateway
