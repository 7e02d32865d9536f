#include "nbdkit/plugin_stack.hpp"

#include "cache/cache_config.hpp"
#include "core/logging.hpp"
#include "core/qos_layer.hpp"
#include "core/retry_layer.hpp"
#include "remote/registry.hpp"

#include <filesystem>

namespace blockway::nbdkit {

using core::BlockDevice;
using core::ConfigError;

PluginStack::PluginStack(PluginConfig cfg) : cfg_(std::move(cfg)), loops_(cfg_.threads, 4) {
  build();
  runner_ = std::thread([this] {
    try {
      loops_.run();
    } catch (const std::exception& e) {
      core::logger("nbdkit")->critical("event loops stopped: {}", e.what());
    }
  });
  if (cache_) cache_->start();
}

PluginStack::~PluginStack() { close(); }

// The same order as gateway::StackBuilder::build() for an export that is not
// a clone: the daemon-wide parts (run-time settings, access rules, the
// remote bandwidth cap) are the daemon's and have no place here.
void PluginStack::build() {
  auto values = cfg_.options;
  core::Options options(values, cfg_.where());
  auto qos = core::QosLimits::take_from(options);
  auto cache_cfg = cache::CacheConfig::take_from(options);
  const remote::OpenEnv env{cfg_.read_only, &loops_.blocking(), &loops_};
  const auto& backend = remote::backend_for(cfg_.uri);
  std::unique_ptr<BlockDevice> device;
  if (cache_cfg) {
    std::error_code ec;
    std::filesystem::create_directories(cfg_.data_dir, ec);
    if (ec) throw ConfigError("cannot create data directory " + cfg_.data_dir + ": " + ec.message());
    try {
      catalogue_ = std::make_unique<cache::MetaStore>(cfg_.data_dir + "/catalogue.db");
      // A detached export (local mode) never opens its remote again.
      device = cache::open_if_detached(*catalogue_, cfg_.name, cfg_.uri);
    } catch (const std::runtime_error& e) {
      throw ConfigError(cfg_.where() + ": " + e.what());
    }
    if (device) {
      backend.check(cfg_.uri, options);
      if (backend.retry()) (void)core::RetryOptions::take_from(options);
    }
  }
  try {
    if (!device && backend.open_local) device = backend.open_local(cfg_.uri, options, env);
    if (!device && backend.open_remote) {
      const auto retry = core::RetryOptions::take_from(options);
      device = std::make_unique<core::RetryLayer>(backend.open_remote(cfg_.uri, options, env), retry);
    }
  } catch (const remote::BackendError& e) {
    throw ConfigError(cfg_.where() + ": " + e.what());
  }
  options.finish();
  if (cache_cfg) {
    cache::CacheLayer::Params params;
    params.export_name = cfg_.name;
    params.remote_uri = cfg_.uri;
    params.config = *cache_cfg;
    params.store = catalogue_.get();
    params.blocking = &loops_.blocking();
    params.background = loops_.at(0).get_executor();
    try {
      auto layer = std::make_unique<cache::CacheLayer>(std::move(device), std::move(params));
      cache_ = layer.get();
      device = std::move(layer);
    } catch (const std::runtime_error& e) {
      throw ConfigError(cfg_.where() + ": " + e.what());
    }
  }
  device = std::make_unique<core::QosLayer>(std::move(device), qos);
  device_ = std::make_shared<core::CheckedDevice>(std::move(device), cfg_.read_only);
  core::logger("nbdkit")->info("{}: {} ({} bytes{})", cfg_.where(), device_->describe(), device_->geometry().size,
                               device_->capabilities().read_only ? ", read-only" : "");
}

void PluginStack::close() {
  if (closed_) return;
  closed_ = true;
  auto log = core::logger("nbdkit");
  try {
    auto& loop = loops_.at(0);
    auto& dev = *device_;
    if (!dev.capabilities().read_only && dev.capabilities().flush != core::Support::none) {
      if (auto ec = run(loop, dev.flush())) log->error("{}: flush at close: {}", cfg_.where(), ec.message());
    }
    run(loop, dev.close());
  } catch (const std::exception& e) {
    log->error("{}: close: {}", cfg_.where(), e.what());
  }
  loops_.release();
  if (runner_.joinable()) runner_.join();
}

}  // namespace blockway::nbdkit
