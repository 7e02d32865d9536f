#include "stack/export_stack.hpp"

#include "core/logging.hpp"
#include "remote/file/file_device.hpp"
#include "remote/registry.hpp"

#include <atomic>
#include <cstdint>
#include <filesystem>

namespace blockway::stack {

using core::BlockDevice;
using core::ConfigError;

LayerOptions LayerOptions::take_from(core::Options& options) {
  LayerOptions layers;
  layers.qos = core::QosLimits::take_from(options);
  layers.cache = cache::CacheConfig::take_from(options);
  return layers;
}

std::unique_ptr<cache::MetaStore> open_catalogue(const std::string& data_dir) {
  std::error_code ec;
  std::filesystem::create_directories(data_dir, ec);
  if (ec) throw ConfigError("cannot create data directory " + data_dir + ": " + ec.message());
  try {
    return std::make_unique<cache::MetaStore>(data_dir + "/catalogue.db");
  } catch (const std::runtime_error& e) {
    throw ConfigError(e.what());
  }
}

LayerOptions check(const std::string& uri, core::Options& options) {
  auto layers = LayerOptions::take_from(options);
  const auto& backend = remote::backend_for(uri);
  backend.check(uri, options);
  if (backend.retry()) (void)core::RetryOptions::take_from(options);
  return layers;
}

Bottom open_bottom(const ExportSpec& spec, bool cached, core::Options& options, const Context& ctx) {
  const remote::OpenEnv env{spec.read_only, &ctx.loops.blocking(), &ctx.loops};
  Bottom bottom;
  try {
    const auto& backend = remote::backend_for(spec.uri);
    if (cached) {
      // A detached export (local mode) never opens its remote again.
      try {
        bottom.device = cache::open_if_detached(ctx.catalogue(), spec.name, spec.uri);
      } catch (const std::runtime_error& e) {
        throw ConfigError(spec.where() + ": " + e.what());
      }
      if (bottom.device) {
        backend.check(spec.uri, options);
        if (backend.retry()) (void)core::RetryOptions::take_from(options);
        return bottom;
      }
    }
    if (backend.open_local) bottom.device = backend.open_local(spec.uri, options, env);
    if (auto* file = dynamic_cast<remote::file::FileDevice*>(bottom.device.get()))
      bottom.current_size = [file] { return file->current_size(); };
    if (!bottom.device && backend.open_remote) {
      // A network session can drop: reconnect and retry right above the remote.
      const auto retry = core::RetryOptions::take_from(options);
      auto opened = backend.open_remote(spec.uri, options, env);
      bottom.remote = opened.get();
      auto layer = std::make_unique<core::RetryLayer>(std::move(opened), retry);
      // Its reconnect loop on a loop of ours, never on a caller's thread that
      // may stop running it (the plugin runs requests on nbdkit's threads).
      layer->reconnect_on(ctx.loops.at(0).get_executor());
      bottom.retry = layer.get();
      bottom.device = std::move(layer);
      if (ctx.remote_bandwidth)
        bottom.device = std::make_unique<core::RemoteBandwidthLayer>(std::move(bottom.device), ctx.remote_bandwidth);
    }
  } catch (const remote::BackendError& e) {
    throw ConfigError(spec.where() + ": " + e.what());
  }
  return bottom;
}

Stack add_layers(const ExportSpec& spec, Bottom bottom, const LayerOptions& layers, const Context& ctx) {
  Stack stack;
  stack.retry = bottom.retry;
  stack.remote = bottom.remote;
  std::unique_ptr<BlockDevice> device = std::move(bottom.device);
  if (layers.cache) {
    cache::CacheLayer::Params params;
    params.export_name = spec.name;
    params.remote_uri = spec.uri;
    params.config = *layers.cache;
    params.store = &ctx.catalogue();
    params.blocking = &ctx.loops.blocking();
    params.background = ctx.loops.at(0).get_executor();
    if (bottom.retry) params.remote_bandwidth = ctx.remote_bandwidth;
    try {
      auto layer = std::make_unique<cache::CacheLayer>(std::move(device), std::move(params));
      stack.cache = layer.get();
      device = std::move(layer);
    } catch (const std::runtime_error& e) {
      throw ConfigError(spec.where() + ": " + e.what());
    }
  }
  // QoS above the cache: cache hits are limited too, as the tenant sees them.
  auto qos = std::make_unique<core::QosLayer>(std::move(device), layers.qos);
  stack.qos = qos.get();
  stack.device = std::make_shared<core::CheckedDevice>(std::move(qos), spec.read_only);
  if (bottom.current_size && !stack.cache) {
    // The layers between hold no size of their own: only the checkpoint
    // on top (and the file's own geometry, which current_size moves) bound
    // requests.
    // A shrink is warned about once, and again only if the image shrinks
    // further: FUSE looks at every open and getattr, and a writer past the
    // image's end grows it again a few KiB at a time (`warned`: the size last
    // warned about, UINT64_MAX while the image is not smaller than served).
    stack.follow_size = [probe = std::move(bottom.current_size), weak = std::weak_ptr(stack.device),
                         where = spec.where(),
                         warned = std::make_shared<std::atomic<uint64_t>>(UINT64_MAX)] {
      auto device = weak.lock();
      if (!device) return;
      const uint64_t served = device->geometry().size, now = probe();
      if (now >= served) warned->store(UINT64_MAX);
      if (now > served) {
        device->grow(now);
        core::logger("stack")->info("{}: the image grew from {} to {} bytes; new clients see the new size", where,
                                    served, now);
      } else if (uint64_t last = warned->load(); now < served && now < last &&
                                                 warned->compare_exchange_strong(last, now)) {
        core::logger("stack")->warn("{}: the image is {} bytes, smaller than the {} served: reads past its end "
                                    "fail, writes there grow it again",
                                    where, now, served);
      }
    };
  }
  return stack;
}

Stack build(const ExportSpec& spec, core::Options& options, const Context& ctx) {
  auto layers = LayerOptions::take_from(options);
  auto bottom = open_bottom(spec, layers.cache.has_value(), options, ctx);
  options.finish();
  return add_layers(spec, std::move(bottom), layers, ctx);
}

}  // namespace blockway::stack
