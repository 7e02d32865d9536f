#include "gateway/daemon.hpp"

#include "gateway/event_loops.hpp"
#include "gateway/export.hpp"
#include "gateway/logging.hpp"
#include "gateway/retry_layer.hpp"
#include "cache/cache_layer.hpp"
#include "nbd/server.hpp"
#include "remote/registry.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/signal_set.hpp>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <optional>

namespace blockway::gateway {
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
// The backend and retry options are still checked (and consumed).
std::unique_ptr<BlockDevice> open_detached_export(ExportConfig& cfg, const remote::OpenRequest& req,
                                                  OpenContext& ctx) {
  std::unique_ptr<BlockDevice> device;
  try {
    device = cache::open_if_detached(ctx.open_catalogue(), cfg.name, cfg.uri);
  } catch (const std::runtime_error& e) {
    throw ConfigError("export '" + cfg.name + "': " + e.what());
  }
  if (device) {
    remote::check_device(req);
    (void)RetryOptions::take_from(cfg.options);
  }
  return device;
}

std::shared_ptr<Export> open_export(ExportConfig cfg, OpenContext& ctx) {
  auto& loops = ctx.loops;
  const auto cache_cfg = cache::CacheConfig::take_from(cfg.options, cfg.name);
  if (!cache_cfg && std::filesystem::exists(ctx.data_dir + "/catalogue.db")) {
    // Serving an export without the cache that still holds its unwritten data
    // would silently show clients old bytes.
    auto& store = ctx.open_catalogue();
    if (auto rec = store.find(cfg.name)) {
      const auto dirty = store.load_bitmap(cfg.name, cache::BitmapKind::dirty, (rec->size / rec->chunk_size) / 64 + 2);
      if (std::any_of(dirty.begin(), dirty.end(), [](uint64_t w) { return w != 0; }))
        throw ConfigError("export '" + cfg.name + "': its cache " + rec->cache_path +
                          " holds data not yet written to " + rec->remote +
                          "; start it with its cache (cache=" +
                          std::filesystem::path(rec->cache_path).parent_path().string() + ",mode=" + rec->mode +
                          ") so the data is written back");
    }
  }
  remote::OpenRequest req;
  req.uri = cfg.uri;
  req.read_only = cfg.read_only;
  req.options = &cfg.options;
  req.blocking = &loops.blocking();
  req.loops = &loops;
  std::unique_ptr<BlockDevice> device;
  try {
    // A detached export (local mode) never opens its remote again.
    if (cache_cfg) device = open_detached_export(cfg, req, ctx);
    if (!device) device = remote::open_device(req);
  } catch (const remote::BackendError& e) {
    throw ConfigError("export '" + cfg.name + "': " + e.what());
  }
  if (auto* remote = dynamic_cast<RemoteDevice*>(device.get())) {
    // A network session can drop: reconnect and retry right above the remote.
    RetryOptions retry;
    try {
      retry = RetryOptions::take_from(cfg.options);
    } catch (const ConfigError& e) {
      throw ConfigError("export '" + cfg.name + "': " + e.what());
    }
    (void)device.release();
    device = std::make_unique<RetryLayer>(std::unique_ptr<RemoteDevice>(remote), retry);
  }
  if (!cfg.options.empty())
    throw ConfigError("export '" + cfg.name + "': unknown option '" + cfg.options.begin()->first + "'");
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
  exports.set_default(config.default_export);
  for (auto* c : open_ctx.caches) c->start();

  nbd::ServerOptions sopts;
  sopts.limits.max_request_bytes = config.max_request_bytes;
  sopts.limits.max_inflight_bytes = config.max_inflight_bytes;
  sopts.handshake_timeout = config.handshake_timeout;
  sopts.shutdown_timeout = config.shutdown_timeout;
  nbd::Server server(loops, exports, sopts);

  boost::asio::signal_set signals(loops.at(0), SIGINT, SIGTERM);
  server.set_on_drained([&] {
    // Every client is gone: let each export stop its background work and
    // persist its state, then let the loops run out of work.
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

  std::function<void(const boost::system::error_code&, int)> on_signal =
      [&](const boost::system::error_code& ec, int sig) {
        if (ec) return;
        log->info("received {}, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
        server.shutdown();
        signals.async_wait(on_signal);
      };
  signals.async_wait(on_signal);

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
