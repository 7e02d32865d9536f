#include "gateway/daemon.hpp"

#include "core/async_event.hpp"
#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "core/logging.hpp"
#include "core/paths.hpp"
#include "core/task.hpp"
#include "fuse/fuse_front_end.hpp"
#include "gateway/control_protocol.hpp"
#include "gateway/control_server.hpp"
#include "gateway/device_commands.hpp"
#include "gateway/fuse_commands.hpp"
#include "gateway/image_commands.hpp"
#include "gateway/metrics.hpp"
#include "gateway/metrics_server.hpp"
#include "gateway/profile_commands.hpp"
#include "gateway/runtime_exports.hpp"
#include "gateway/service_manager.hpp"
#include "gateway/socket_activation.hpp"
#include "gateway/stack_builder.hpp"
#include "gateway/snapshot_commands.hpp"
#include "gateway/snapshot_exports.hpp"
#include "gateway/trace_commands.hpp"
#include "nbd/server.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

namespace blockway::gateway {

using core::ConfigError;
using core::EventLoops;
using core::Export;
using core::ExportTable;
using core::ListenAddress;
using core::Task;

namespace {

Json remote_bandwidth_json(const core::RemoteBandwidth& cap) {
  const auto s = cap.stats();
  Json j{{"rate", s.rate}};
  for (size_t c = 0; c < 2; ++c)
    j[c == 0 ? "client" : "prefetch"] = {{"bytes", s.bytes[c]},
                                         {"delayed", s.delayed[c]},
                                         {"delay_seconds", s.delay_seconds[c]},
                                         {"queued", s.queued[c]}};
  return j;
}

// remote-bandwidth {rate?}: the cap and its counters; with `rate`, a new cap
// until the next start (0 lifts it). The cap's layers are in the stacks only
// when one was set at start, so without one there is nothing to change.
core::Task<Json> remote_bandwidth_command(std::shared_ptr<core::RemoteBandwidth> cap, Json req) {
  if (!cap)
    throw ControlError("refused", EOPNOTSUPP,
                       "no remote bandwidth cap was set at start (--remote-bandwidth, or remote-bandwidth in the "
                       "configuration file); start with one to change it at run time");
  if (req.contains("rate")) {
    const uint64_t rate = arg_size(req, "rate");
    cap->set_rate(rate);
    core::logger("daemon")->info("remote bandwidth cap changed to {} bytes/s{}", rate, rate ? "" : " (no cap)");
  }
  co_return remote_bandwidth_json(*cap);
}

// ExportCommandHooks::forget_file: FuseFrontEnd::forget on the blocking pool
// (it may wait for the kernel). `fuse` is null until the front end is made.
core::Task<void> forget_fuse_file(boost::asio::thread_pool& pool, fuse::FuseFrontEnd* fuse,
                                  std::shared_ptr<Export> exp) {
  if (!fuse) co_return;
  auto forget = [fuse, exp] {
    try {
      fuse->forget(exp);
    } catch (const std::exception& e) {  // offload's callable must not throw; the caches time out in a second
      core::logger("fuse")->warn("FUSE: cannot have the kernel forget '{}': {}", exp->name, e.what());
    }
    return true;
  };
  (void)co_await core::offload(pool, std::move(forget));
}

}  // namespace

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

// The defaults that depend on the rest of the configuration: the data
// directory, the demo export and the listen addresses (none when systemd
// passed listening sockets: those are the listeners then).
void complete(DaemonConfig& config, bool sockets_passed) {
  if (config.data_dir.empty()) config.data_dir = core::default_data_dir();
  if (config.embedded_default) {
    config.exports.push_back(demo_export(config.data_dir));
    if (config.listen.empty() && !sockets_passed) {
      config.listen.push_back(ListenAddress::parse("127.0.0.1:10809"));
      config.listen.push_back(ListenAddress::parse("[::1]:10809"));
    }
  }
  if (config.listen.empty() && !config.stdio_export && !sockets_passed)
    config.listen.push_back(ListenAddress::parse("127.0.0.1:10809"));
  config.validate();
}

void log_stats(spdlog::logger& log, const Export& exp) {
  const auto s = exp.device->stats().snapshot();
  log.info("export '{}': {} reads ({} bytes), {} writes ({} bytes), {} flushes, {} trims, {} zeroes, "
           "{} block-status, {} prefetches, {} errors",
           exp.name, s.reads, s.bytes_read, s.writes, s.bytes_written, s.flushes, s.trims, s.zeroes,
           s.block_status, s.prefetches, s.errors);
}

// The control socket: the configured path (a failure stops the start), or
// the default one, which another daemon may hold (then none, with a warning).
void listen_control(ControlServer& control, const DaemonConfig& config, spdlog::logger& log) {
  if (config.control_socket == "off") return;
  const bool explicit_path = !config.control_socket.empty();
  const std::string path = explicit_path ? config.control_socket : core::default_control_socket();
  try {
    if (!explicit_path && ControlServer::is_live(path))
      throw std::runtime_error("control socket " + path + ": another daemon is listening there");
    const gid_t group = config.control_socket_group.empty()
                            ? static_cast<gid_t>(-1)
                            : static_cast<gid_t>(control_group_id(config.control_socket_group));
    control.listen(path, static_cast<mode_t>(config.control_mode()), group);
    log.info("control socket {}", path);
  } catch (const std::runtime_error& e) {
    if (explicit_path) throw ConfigError(e.what());
    // The default path is shared by every daemon on the machine: a second
    // one still serves its exports, without a control socket.
    log.warn("{}; running without a control socket (set --control-socket or [control] socket)", e.what());
  }
}

// What the shutdown sequence waits for. Touched on loop 0 only: the front
// ends' callbacks post there.
struct Drain {
  explicit Drain(EventLoops& loops) : changed(loops.at(0).get_executor()) {}
  core::AsyncEvent changed;     // the NBD server drained, or the FUSE mount went
  bool server_drained = false;  // after SIGTERM/SIGINT, or (--stdio) when the client left
};

// The daemon's end, as one sequence on loop 0: once the NBD server has
// drained and no FUSE mount is left (unmounted then, or never mounted; one
// made at run time is waited for too), the control plane stops (export-add
// refuses, the socket closes, a request already running finishes), and every
// export closes: it stops its background work and persists its state. Then
// the loops may run out of work.
Task<void> shut_down(Drain& drain, fuse::FuseFrontEnd& fuse, RuntimeExports& runtime_exports, ControlServer& control,
                     MetricsServer& metrics, TraceCommands& traces, ExportTable& exports,
                     ServiceManager& service) {
  while (!drain.server_drained || fuse.active()) co_await drain.changed.wait();
  runtime_exports.set_shutting_down();
  control.stop();
  metrics.stop();
  traces.stop();
  for (const auto& exp : exports.list()) co_await exp->device->close();
  service.stop();
}

}  // namespace

int run_daemon(DaemonConfig config) {
  auto log = core::logger("daemon");
  auto passed = take_passed_sockets();
  complete(config, !passed.empty());
  // Checked before any export opens: a passed socket that fits no listen
  // address stops the start.
  auto listen_plan = plan_listeners(config.listen, std::move(passed));
  // Checked before anything starts; a [fuse] table without a mountpoint
  // only sets the options of a mount made later at run time.
  auto fuse_options =
      fuse::FuseOptions::parse(config.fuse ? config.fuse->options : std::map<std::string, std::string>{});
  fuse_options.shutdown_timeout = config.shutdown_timeout;

  std::signal(SIGPIPE, SIG_IGN);  // a vanished client is an error code, not a signal
  EventLoops loops(config.threads, config.blocking_threads);
  ExportTable exports;
  // STATUS=/READY=1/STOPPING=1/WATCHDOG=1 to systemd; counts clients on
  // loop 0 through `server`, which exists by the time ready() runs.
  nbd::Server* server_ptr = nullptr;
  ServiceManager service(loops, exports, [&server_ptr] { return server_ptr ? server_ptr->connection_count() : 0; });
  service.starting("opening exports");
  std::vector<ExportConfig> all = config.exports;
  if (config.stdio_export) all.push_back(*config.stdio_export);
  StackBuilder builder(loops, config.data_dir);
  builder.set_remote_bandwidth(config.remote_bandwidth);
  builder.set_export_lookup([&exports](const std::string& name) { return exports.find(name); });
  std::vector<cache::CacheLayer*> caches;  // started once every export is open
  RuntimeExports runtime_exports(builder, exports, loops);
  runtime_exports.set_tls_enabled(config.tls.mode != nbd::TlsMode::off);
  // One export that cannot be opened (its remote down, its image missing, a
  // mistake in its options) does not take the others down: it is listed as
  // failed and retried in the background. Only a daemon that would serve
  // nothing at all, or one client on stdio, stops at once.
  std::exception_ptr first_failure;
  for (auto& e : all) {
    try {
      auto [exp, cache] = builder.build(e);
      log->info("export '{}': {} ({} bytes{})", exp->name, exp->device->describe(), exp->device->geometry().size,
                exp->device->capabilities().read_only ? ", read-only" : "");
      exports.add(std::move(exp));
      if (cache) caches.push_back(cache);
    } catch (const std::exception& err) {
      if (config.stdio_export) throw;
      if (!first_failure) first_failure = std::current_exception();
      log->error("export '{}' cannot be opened; serving the others and retrying it in the background "
                 "(blockway status shows it): {}", e.name, err.what());
      runtime_exports.add_failed(e, err.what());
    }
  }
  runtime_exports.open_saved(caches);
  if (first_failure && exports.list().empty()) std::rethrow_exception(first_failure);
  for (const auto& exp : exports.list()) publish_snapshots(exports, exp, builder.snapshots_of(exp));
  exports.set_default(config.default_export);
  for (auto* c : caches) c->start();

  // The control plane: the dispatch table, then its socket (after the NBD
  // sockets, below). Adding a command is one add() here, in
  // add_export_commands() or in add_fuse_commands().
  ControlDispatcher control_commands;
  ExportCommandHooks hooks;
  hooks.persist = [&runtime_exports](std::shared_ptr<Export> exp, std::string key, std::string value) {
    return runtime_exports.persist(std::move(exp), std::move(key), std::move(value));
  };
  hooks.failed_exports = [&runtime_exports] { return runtime_exports.failed_json(); };
  if (auto cap = builder.remote_bandwidth()) hooks.remote_bandwidth = [cap] { return remote_bandwidth_json(*cap); };
  // The FUSE front end is made below; the control plane runs once it is.
  fuse::FuseFrontEnd* fuse_ptr = nullptr;
  hooks.fuse_mount = [&fuse_ptr, &fuse_options] {
    return ExportCommandHooks::FuseMount{.mountpoint = fuse_ptr ? fuse_ptr->mountpoint() : std::string(),
                                         .uid = fuse_options.uid,
                                         .gid = fuse_options.gid,
                                         .mode = fuse_options.mode};
  };
  hooks.forget_file = [&fuse_ptr, &loops](std::shared_ptr<Export> exp) {
    return forget_fuse_file(loops.blocking(), fuse_ptr, std::move(exp));
  };
  control_commands.add("remote-bandwidth", "show or change the daemon-wide remote bandwidth cap {rate?}",
                       [cap = builder.remote_bandwidth()](const Json& req) { return remote_bandwidth_command(cap, req); });
  add_export_commands(control_commands, exports, std::move(hooks));
  control_commands.add("export-add", "add an export and save it in the catalogue {name, uri, options?}",
                       [&runtime_exports](const Json& req) { return runtime_exports.add(req); });
  control_commands.add("export-remove", "remove an export {name, force?}",
                       [&runtime_exports](const Json& req) { return runtime_exports.remove(req); });
  add_snapshot_commands(control_commands, exports,
                        [&builder](const std::shared_ptr<Export>& exp) { return builder.snapshots_of(exp); });
  add_image_commands(control_commands, exports, loops.blocking());
  add_profile_commands(control_commands, exports, loops.blocking());
  TraceCommands trace_commands(loops.at(0), exports);
  trace_commands.add_to(control_commands);
  ControlServer control(loops.at(0), control_commands);
  // The metrics endpoint. Per-export metric families of other modules are
  // one metrics_collector.add_export_provider() here.
  MetricsCollector metrics_collector(exports);
  if (auto cap = builder.remote_bandwidth())
    metrics_collector.add_daemon_provider([cap](MetricsWriter& out) { write_remote_bandwidth_metrics(cap->stats(), out); });
  metrics_collector.add_daemon_provider([&runtime_exports](MetricsWriter& out) {
    const Json failed = runtime_exports.failed_json();
    out.family("blockway_exports_failed", MetricsWriter::Type::gauge,
               "Exports that could not be opened and are being retried (blockway status says why).");
    out.sample("blockway_exports_failed", {}, static_cast<double>(failed.size()));
    out.family("blockway_export_open_attempts", MetricsWriter::Type::gauge,
               "Attempts made so far to open each failed export.");
    for (const auto& e : failed)
      out.sample("blockway_export_open_attempts", {{"export", e.at("name").get<std::string>()}},
                 e.at("attempts").get<double>());
  });
  MetricsServer metrics(loops.at(0), metrics_collector);

  nbd::ServerOptions sopts;
  sopts.limits.max_request_bytes = config.max_request_bytes;
  sopts.limits.max_inflight_bytes = config.max_inflight_bytes;
  sopts.handshake_timeout = config.handshake_timeout;
  sopts.shutdown_timeout = config.shutdown_timeout;
  sopts.unix_access = config.unix_socket_access();
  if ((sopts.unix_access.mode || sopts.unix_access.uid || sopts.unix_access.gid) && listen_plan.bind.empty())
    log->warn("socket-mode/socket-user/socket-group apply only to sockets blockwayd binds: the ones systemd "
              "passed keep the socket unit's SocketMode=, SocketUser= and SocketGroup=");
  if (config.tls.mode != nbd::TlsMode::off) {
    try {
      sopts.tls = std::make_shared<nbd::TlsContext>(config.tls);
    } catch (const std::runtime_error& e) {
      throw ConfigError(e.what());
    }
    sopts.tls_mode = config.tls.mode;
    log->info("NBD over TLS: {} ({}{}{}; priority {})", nbd::to_string(config.tls.mode),
              config.tls.certificates_dir.empty() ? "" : "certificates " + config.tls.certificates_dir,
              !config.tls.certificates_dir.empty() && !config.tls.psk_file.empty() ? ", " : "",
              config.tls.psk_file.empty() ? "" : "PSK " + config.tls.psk_file,
              config.tls.priority.empty() ? std::string("the default") : "'" + config.tls.priority + "'");
  }
  nbd::Server server(loops, exports, sopts);
  server_ptr = &server;
  // Kernel devices: those the last daemon attached get fresh sockets, then
  // the configured ones are attached (before "ready", like the listeners).
  nbd::KernelDevices kernel_devices(loops, exports, server);
  DeviceCommands device_commands(kernel_devices, runtime_exports, builder, loops);
  device_commands.add_to(control_commands);
  runtime_exports.set_device_lookup([&device_commands](const std::string& name) {
    return device_commands.devices_of(name);
  });
  device_commands.start(config.devices);
  runtime_exports.set_on_opened([&device_commands](const std::string& name) { device_commands.attach_waiting(name); });

  // SIGHUP stops the daemon like SIGTERM (as nbdkit and qemu-nbd do): it has
  // no configuration to reload, and the default action would end it without
  // flushing its clients' writes or closing its caches (a closed terminal).
  boost::asio::signal_set signals(loops.at(0), SIGINT, SIGTERM, SIGHUP);
  // The FUSE front end: mounted below if configured; a control command can
  // mount() and unmount() it at run time.
  auto fuse_front = std::make_unique<fuse::FuseFrontEnd>(loops, exports, fuse_options);
  fuse_ptr = fuse_front.get();
  Drain drain(loops);
  server.set_on_drained([&] {
    boost::asio::post(loops.at(0), [&] {
      drain.server_drained = true;
      fuse_front->unmount();  // --stdio: the client left
      drain.changed.notify();
    });
  });
  fuse_front->set_on_unmounted([&] { boost::asio::post(loops.at(0), [&] { drain.changed.notify(); }); });
  std::atomic<bool> stopping{false};  // set by SIGTERM/SIGINT
  add_fuse_commands(control_commands, *fuse_front, loops.blocking(), stopping);

  if (config.stdio_export) server.serve_stdio();
  for (const auto& passed_socket : listen_plan.adopt) {
    try {
      log->info("listening on {} (socket passed by systemd{})", server.adopt(passed_socket.fd, passed_socket.name),
                passed_socket.name.empty() ? "" : ": " + passed_socket.name);
    } catch (const std::runtime_error& e) {
      throw ConfigError(e.what());
    }
  }
  for (const auto& addr : listen_plan.bind) {
    try {
      for (const auto& b : server.listen(addr)) log->info("listening on {}", b);
    } catch (const std::runtime_error& e) {
      throw ConfigError(e.what());
    }
  }
  listen_control(control, config, *log);
  if (config.metrics) {
    try {
      log->info("metrics on http://{}/metrics", metrics.listen(*config.metrics));
    } catch (const std::runtime_error& e) {
      throw ConfigError(e.what());
    }
  }

  std::function<void(const boost::system::error_code&, int)> on_signal = [&](const boost::system::error_code& ec,
                                                                             int sig) {
    if (ec) return;
    log->info("received {}, shutting down{}", sig == SIGINT ? "SIGINT" : sig == SIGHUP ? "SIGHUP" : "SIGTERM",
              sig == SIGHUP ? " (blockwayd has no configuration reload: blockway export add/remove, mode and "
                              "the other commands change a running daemon)"
                            : "");
    stopping = true;
    service.stopping();
    // No more retries of failed exports, and an open in flight (a retry's,
    // an export-add's) is abandoned: a remote that accepts and never answers
    // would hold the stop for its io-timeout.
    runtime_exports.set_shutting_down();
    kernel_devices.stop();  // the kernel keeps them for the next daemon
    server.shutdown();
    fuse_front->unmount();
    signals.async_wait(on_signal);
  };
  signals.async_wait(on_signal);
  boost::asio::co_spawn(loops.at(0),
                        shut_down(drain, *fuse_front, runtime_exports, control, metrics, trace_commands, exports,
                                  service),
                        [&](std::exception_ptr e) {
                          if (e) log->error("closing the exports failed");
                          service.stop();  // its timers would keep the loops running
                          boost::system::error_code ignored;
                          signals.cancel(ignored);
                          loops.release();
                        });

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
  service.ready();
  runtime_exports.start_retrying();

  loops.run();
  for (const auto& exp : exports.list()) log_stats(*log, *exp);
  if (!config.pid_file.empty()) ::unlink(config.pid_file.c_str());
  log->info("stopped");
  return 0;
}

}  // namespace blockway::gateway
