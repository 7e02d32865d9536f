// blockwayd: the blockway daemon's command line.
#include "core/logging.hpp"
#include "core/options.hpp"
#include "gateway/config.hpp"
#include "gateway/daemon.hpp"

#include <cstdio>
#include <iostream>
#include <string>
#include <string_view>

namespace {

constexpr const char* kUsage = R"(Usage: blockwayd [OPTIONS]

Serves disk images as NBD exports.

  --config FILE          read settings from a TOML file (see README)
  --listen ADDR          listen on HOST:PORT, [IPV6]:PORT or unix:/path (repeatable;
                         default 127.0.0.1:10809)
  --export NAME=URI[,OPT=VAL...]
                         add an export (repeatable); URI is file:///path/to.img;
                         options: read-only=on|off (or ro), description=TEXT
  --stdio NAME=URI[,...] serve one client on stdin/stdout and exit when it leaves
  --default-export NAME  export chosen by clients that ask for the empty name
  --threads N            event-loop threads (default: one per core)
  --blocking-threads N   threads for calls that may block (default 16)
  --max-inflight SIZE    per-connection cap on bytes in flight (default 128M)
  --max-request SIZE     largest read or write payload (default 32M)
  --handshake-timeout S  seconds a client may take to choose an export (default 10)
  --shutdown-timeout S   seconds SIGTERM waits for connections before closing them
                         (default 30)
  --data-dir DIR         where the demo image lives (default /var/lib/blockway
                         for root, else ~/.local/share/blockway)
  --fuse-mount DIR[,OPT=VAL...]
                         also show every export as a file in DIR (FUSE); options:
                         mode=0644, uid=N, gid=N, allow-other, direct-io
  --pid-file FILE        write the pid here once every socket listens
  --log-level LEVEL      trace, debug, info, warn, error or off (default info)
  --control-socket PATH  the control socket used by the blockway command (default
                         /run/blockway/control.sock for root; "off" disables it)
  --control-group GROUP  the control socket's group (name or number): its members
                         may use blockway; mode 0660 unless [control] mode says
                         otherwise (default: none, a root-only socket; wins over
                         [control] group)
  --version, --help

With no --config, --export or --stdio it serves its embedded default: a sparse
1 GiB demo image as export "demo" on localhost:10809.
)";

}  // namespace

int main(int argc, char** argv) {
  using namespace blockway::gateway;
  namespace core = blockway::core;
  DaemonConfig cfg;
  std::string config_file;
  std::vector<core::ListenAddress> cli_listen;
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    for (size_t i = 0; i < args.size(); ++i) {
      std::string arg = args[i], value;
      bool has_value = false;
      if (auto eq = arg.find('='); arg.starts_with("--") && eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_value = true;
      }
      auto need = [&]() -> std::string {
        if (has_value) return value;
        if (i + 1 >= args.size()) throw core::ConfigError(arg + " needs a value");
        return args[++i];
      };
      if (arg == "--help" || arg == "-h") {
        std::cout << kUsage;
        return 0;
      } else if (arg == "--version") {
        std::cout << "blockwayd " << BLOCKWAY_VERSION << "\n";
        return 0;
      } else if (arg == "--config") {
        config_file = need();
      } else if (arg == "--listen") {
        cli_listen.push_back(core::ListenAddress::parse(need()));
      } else if (arg == "--export") {
        cfg.exports.push_back(ExportConfig::parse_spec(need()));
      } else if (arg == "--stdio") {
        cfg.stdio_export = ExportConfig::parse_spec(need());
      } else if (arg == "--default-export") {
        cfg.default_export = need();
      } else if (arg == "--threads") {
        cfg.threads = static_cast<unsigned>(core::parse_size(need(), "--threads"));
      } else if (arg == "--blocking-threads") {
        cfg.blocking_threads = static_cast<unsigned>(core::parse_size(need(), "--blocking-threads"));
      } else if (arg == "--max-inflight") {
        cfg.max_inflight_bytes = core::parse_size(need(), "--max-inflight");
      } else if (arg == "--max-request") {
        const auto v = core::parse_size(need(), "--max-request");
        if (v > UINT32_MAX) throw core::ConfigError("--max-request is too large");
        cfg.max_request_bytes = static_cast<uint32_t>(v);
      } else if (arg == "--handshake-timeout") {
        cfg.handshake_timeout = core::parse_seconds(need(), "--handshake-timeout");
      } else if (arg == "--shutdown-timeout") {
        cfg.shutdown_timeout = core::parse_seconds(need(), "--shutdown-timeout");
      } else if (arg == "--data-dir") {
        cfg.data_dir = need();
      } else if (arg == "--fuse-mount") {
        cfg.fuse = FuseMountConfig::parse_spec(need());
      } else if (arg == "--pid-file") {
        cfg.pid_file = need();
      } else if (arg == "--log-level") {
        cfg.log_level = need();
      } else if (arg == "--control-socket") {
        cfg.control_socket = need();
        if (cfg.control_socket.empty()) throw core::ConfigError("--control-socket needs a path (or off)");
      } else if (arg == "--control-group") {
        cfg.control_socket_group = need();
        (void)control_group_id(cfg.control_socket_group, "--control-group");  // an unknown group stops here
      } else {
        throw core::ConfigError("unknown argument '" + args[i] + "' (see --help)");
      }
    }
    if (!config_file.empty()) {
      DaemonConfig from_file;
      load_config_file(config_file, from_file);
      // Command-line values win; exports from both places are served.
      from_file.exports.insert(from_file.exports.end(), cfg.exports.begin(), cfg.exports.end());
      if (cfg.stdio_export) from_file.stdio_export = cfg.stdio_export;
      if (!cfg.default_export.empty()) from_file.default_export = cfg.default_export;
      if (cfg.threads) from_file.threads = cfg.threads;
      if (cfg.blocking_threads != DaemonConfig{}.blocking_threads) from_file.blocking_threads = cfg.blocking_threads;
      if (cfg.max_inflight_bytes != DaemonConfig{}.max_inflight_bytes) from_file.max_inflight_bytes = cfg.max_inflight_bytes;
      if (cfg.max_request_bytes != DaemonConfig{}.max_request_bytes) from_file.max_request_bytes = cfg.max_request_bytes;
      if (!cfg.data_dir.empty()) from_file.data_dir = cfg.data_dir;
      if (cfg.handshake_timeout != DaemonConfig{}.handshake_timeout) from_file.handshake_timeout = cfg.handshake_timeout;
      if (cfg.shutdown_timeout != DaemonConfig{}.shutdown_timeout) from_file.shutdown_timeout = cfg.shutdown_timeout;
      if (!cfg.pid_file.empty()) from_file.pid_file = cfg.pid_file;
      if (cfg.fuse) {  // the command line's directory; its options over the file's
        if (!from_file.fuse) from_file.fuse.emplace();
        from_file.fuse->mountpoint = cfg.fuse->mountpoint;
        for (const auto& [k, v] : cfg.fuse->options) from_file.fuse->options[k] = v;
      }
      if (cfg.log_level != DaemonConfig{}.log_level) from_file.log_level = cfg.log_level;
      if (!cfg.control_socket.empty()) from_file.control_socket = cfg.control_socket;
      if (!cfg.control_socket_group.empty()) from_file.control_socket_group = cfg.control_socket_group;
      cfg = std::move(from_file);
    }
    if (!cli_listen.empty()) cfg.listen = cli_listen;
    cfg.embedded_default = config_file.empty() && cfg.exports.empty() && !cfg.stdio_export;
    cfg.validate();
    core::init_logging(cfg.log_level);
    return run_daemon(std::move(cfg));
  } catch (const core::ConfigError& e) {
    std::fprintf(stderr, "blockwayd: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "blockwayd: fatal: %s\n", e.what());
    return 1;
  }
}
