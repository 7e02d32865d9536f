// The export stack: what blockwayd (gateway/stack_builder.cpp) and the nbdkit
// plugin (nbdkit/plugin_stack.cpp) both serve, built in one place so the two
// cannot drift apart. URI + options + cache configuration -> layers, bottom up:
//
//   the stand-in remote of an export detached in an earlier run (local mode:
//   its remote is never opened again), or the backend the URI's scheme names
//   (remote/registry.cpp)
//   RetryLayer            above a backend whose session can be lost
//   RemoteBandwidthLayer  above that, when the context has a daemon-wide cap
//   CacheLayer            when the options name a cache directory (cache=DIR)
//   QosLayer              always: the export's qos-* limits, none by default
//   CheckedDevice         always: the one checkpoint that validates and emulates
//
// Each part takes its options from one core::Options, in this order; the
// caller's finish() then reports what is left as unknown. Every error is a
// core::ConfigError naming the export. The steps are separate so the daemon
// can put what only it has around them (run-time settings before the bottom
// opens, a clone's overlay as the bottom, access rules and file attributes
// before the cache is made, health, control and resize after); build() is
// the whole sequence with nothing added, which is the plugin's.
//
// Thread model: start-up, or the daemon's blocking pool for export-add; the
// caller runs one build at a time per catalogue. Nothing here is on the data
// path; the layers it returns are, shared by every loop.
#pragma once

#include "cache/cache_config.hpp"
#include "cache/cache_layer.hpp"
#include "cache/meta_store.hpp"
#include "core/block_device.hpp"
#include "core/checked_device.hpp"
#include "core/event_loops.hpp"
#include "core/options.hpp"
#include "core/qos_layer.hpp"
#include "core/remote_bandwidth.hpp"
#include "core/remote_device.hpp"
#include "core/retry_layer.hpp"

#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace blockway::stack {

// Where a stack is built.
struct Context {
  core::EventLoops& loops;
  // The catalogue, opened on first use: only a cached export asks for it.
  // Throws core::ConfigError (or std::runtime_error).
  std::function<cache::MetaStore&()> catalogue;
  // The daemon-wide cap on remote bandwidth; null: none.
  std::shared_ptr<core::RemoteBandwidth> remote_bandwidth = nullptr;
};

// The export a stack is built for.
struct ExportSpec {
  std::string name;
  std::string uri;
  bool read_only = false;
  // "export 'NAME'", how messages name it.
  [[nodiscard]] std::string where() const { return "export '" + name + "'"; }
};

// The options of the layers above the bottom, taken first.
struct LayerOptions {
  core::QosLimits qos;
  std::optional<cache::CacheConfig> cache;
  static LayerOptions take_from(core::Options& options);
};

// The bottom of a stack and the parts of it the daemon watches.
struct Bottom {
  std::unique_ptr<core::BlockDevice> device;
  core::RemoteDevice* remote = nullptr;  // the backend's device if its session can be lost; owned by `device`
  core::RetryLayer* retry = nullptr;     // the RetryLayer right above it; likewise
  // The image's size now, for a backend whose image can grow without telling
  // (file://: truncate, qemu-img resize, lvextend); null for the others.
  std::function<uint64_t()> current_size;
};

// The stack, top first.
struct Stack {
  std::shared_ptr<core::CheckedDevice> device;
  core::QosLayer* qos = nullptr;       // owned by `device`'s chain, like the rest
  cache::CacheLayer* cache = nullptr;  // if cached: start() it once the export is served
  core::RetryLayer* retry = nullptr;
  core::RemoteDevice* remote = nullptr;
  // For an uncached stack on a bottom with current_size: looks at the
  // image's size again and grows the stack when it grew (a new client then
  // sees the new size; connected ones keep theirs, as NBD has no way to tell
  // them). A front end calls it as a client connects. Null for a cached
  // stack (its cache file and maps are sized when it opens: it grows at the
  // next open, CacheLayer::grow_cache) and for backends that say themselves
  // (rbd's watch: RemoteDevice::set_resize_handler). Any thread.
  std::function<void()> follow_size;
};

// The catalogue in `data_dir` (catalogue.db), the directory made if missing.
// Throws core::ConfigError.
std::unique_ptr<cache::MetaStore> open_catalogue(const std::string& data_dir);

// Takes the layer options, then checks the backend's options and takes the
// retry options, as build() does, without opening anything. The caller
// finish()es `options`.
LayerOptions check(const std::string& uri, core::Options& options);

// Opens the bottom. A cached export detached in an earlier run gets its
// stand-in (the backend's and retry options are still checked and taken);
// otherwise the backend's local device, or its remote device with a
// RetryLayer (and the bandwidth cap's layer) above.
Bottom open_bottom(const ExportSpec& spec, bool cached, core::Options& options, const Context& ctx);

// Puts the CacheLayer (when layers.cache), the QosLayer and the CheckedDevice
// on `bottom`.
Stack add_layers(const ExportSpec& spec, Bottom bottom, const LayerOptions& layers, const Context& ctx);

// The whole stack: take_from, open_bottom, options.finish(), add_layers.
Stack build(const ExportSpec& spec, core::Options& options, const Context& ctx);

}  // namespace blockway::stack
