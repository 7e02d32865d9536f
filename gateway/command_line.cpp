#include "gateway/command_line.hpp"

#include "cache/cache_config.hpp"
#include "cache/overlay_config.hpp"
#include "core/options.hpp"
#include "core/qos_layer.hpp"
#include "core/retry_layer.hpp"
#include "fuse/fuse_front_end.hpp"
#include "remote/registry.hpp"

#include <cstdint>

namespace blockway::gateway {
namespace {

using core::ConfigError;

// One flag: its name, the placeholder of its value (none: it takes none),
// its help (lines after the first continue under it) and what it sets.
struct Flag {
  std::string_view name;
  std::string_view value;
  std::string_view help;
  void (*apply)(CommandLine& line, const std::string& value);
};

const Flag kFlags[] = {
    {"--config", "FILE", "read settings from a TOML file (see README)",
     [](CommandLine& l, const std::string& v) { l.config_file = v; }},
    {"--listen", "ADDR", "listen on HOST:PORT, [IPV6]:PORT or unix:/path (repeatable; default 127.0.0.1:10809)",
     [](CommandLine& l, const std::string& v) { l.listen.push_back(core::ListenAddress::parse(v)); }},
    {"--socket-mode", "MODE",
     "file mode of the NBD Unix sockets (--listen unix:/PATH), octal like 0660 (default: 0777 less the umask; "
     "0660 with --socket-group). Set before the socket listens; systemd's sockets keep SocketMode=",
     [](CommandLine& l, const std::string& v) { l.config.socket_mode = parse_socket_mode(v, "--socket-mode"); }},
    {"--socket-user", "USER", "owner of the NBD Unix sockets (a name or uid; needs root)",
     [](CommandLine& l, const std::string& v) {
       (void)socket_user_id(v, "--socket-user");  // an unknown user stops here
       l.config.socket_user = v;
     }},
    {"--socket-group", "GROUP", "group of the NBD Unix sockets (a name or gid): its members may connect",
     [](CommandLine& l, const std::string& v) {
       (void)socket_group_id(v, "--socket-group");
       l.config.socket_group = v;
     }},
    {"--export", "NAME=URI[,OPT=VAL...]", "add an export (repeatable); the URIs and options are listed below",
     [](CommandLine& l, const std::string& v) { l.config.exports.push_back(ExportConfig::parse_spec(v)); }},
    {"--stdio", "NAME=URI[,...]", "serve one client on stdin/stdout and exit when it leaves",
     [](CommandLine& l, const std::string& v) { l.config.stdio_export = ExportConfig::parse_spec(v); }},
    {"--default-export", "NAME", "export chosen by clients that ask for the empty name",
     [](CommandLine& l, const std::string& v) { l.config.default_export = v; }},
    {"--threads", "N", "event-loop threads (default: one per core)",
     [](CommandLine& l, const std::string& v) {
       l.config.threads = static_cast<unsigned>(core::parse_number(v, "--threads", 0, UINT32_MAX));
     }},
    {"--blocking-threads", "N", "threads for calls that may block (default 16)",
     [](CommandLine& l, const std::string& v) {
       l.config.blocking_threads = static_cast<unsigned>(core::parse_number(v, "--blocking-threads", 0, UINT32_MAX));
     }},
    {"--max-inflight", "SIZE", "per-connection cap on bytes in flight (default 128M; one request is always admitted)",
     [](CommandLine& l, const std::string& v) { l.config.max_inflight_bytes = core::parse_size(v, "--max-inflight"); }},
    {"--remote-bandwidth", "SIZE",
     "cap on bytes per second to and from network remotes, all exports together, shared 3:1 by client "
     "requests and prefetch when both wait (default 0: no cap)",
     [](CommandLine& l, const std::string& v) { l.config.remote_bandwidth = core::parse_size(v, "--remote-bandwidth"); }},
    {"--max-request", "SIZE", "largest read or write payload (default 32M)",
     [](CommandLine& l, const std::string& v) {
       const auto n = core::parse_size(v, "--max-request");
       if (n > UINT32_MAX) throw ConfigError("--max-request is too large");
       l.config.max_request_bytes = static_cast<uint32_t>(n);
     }},
    {"--handshake-timeout", "S", "seconds a client may take to choose an export (default 10)",
     [](CommandLine& l, const std::string& v) {
       l.config.handshake_timeout = core::parse_seconds(v, "--handshake-timeout");
     }},
    {"--shutdown-timeout", "S", "seconds SIGTERM waits for connections before closing them (default 30)",
     [](CommandLine& l, const std::string& v) {
       l.config.shutdown_timeout = core::parse_seconds(v, "--shutdown-timeout");
     }},
    {"--data-dir", "DIR",
     "where the catalogue and the demo image live (default $STATE_DIRECTORY under systemd, "
     "/var/lib/blockway for root, else ~/.local/share/blockway)",
     [](CommandLine& l, const std::string& v) { l.config.data_dir = v; }},
    {"--fuse-mount", "DIR[,OPT=VAL...]",
     "also show every export as a file in DIR (FUSE); the options are listed below",
     [](CommandLine& l, const std::string& v) { l.config.fuse = FuseMountConfig::parse_spec(v); }},
    {"--pid-file", "FILE", "write the pid here once every socket listens",
     [](CommandLine& l, const std::string& v) { l.config.pid_file = v; }},
    {"--log-level", "LEVEL", "trace, debug, info, warn, error or off (default info)",
     [](CommandLine& l, const std::string& v) { l.config.log_level = v; }},
    {"--log-format", "FORMAT",
     "text, or json: one object a line (time, level, logger, message, pid, thread) for log shippers (default "
     "text). Under systemd, lines carry their syslog priority for the journal",
     [](CommandLine& l, const std::string& v) { l.config.log_format = core::parse_log_format(v, "--log-format"); }},
    {"--control-socket", "PATH",
     "the control socket used by the blockway command (default $RUNTIME_DIRECTORY/control.sock under "
     "systemd, /run/blockway/control.sock for root; \"off\" disables it)",
     [](CommandLine& l, const std::string& v) {
       if (v.empty()) throw ConfigError("--control-socket needs a path (or off)");
       l.config.control_socket = v;
     }},
    {"--control-group", "GROUP",
     "the control socket's group (name or number): its members may use blockway; mode 0660 unless [control] "
     "mode says otherwise (default: none, a root-only socket; wins over [control] group)",
     [](CommandLine& l, const std::string& v) {
       (void)control_group_id(v, "--control-group");  // an unknown group stops here
       l.config.control_socket_group = v;
     }},
    {"--metrics", "ADDR",
     "serve Prometheus metrics on http://ADDR/metrics: HOST:PORT, [IPV6]:PORT, PORT (on 127.0.0.1) or HOST "
     "(port 9110); \"off\" disables it (default: off; wins over [metrics] listen)",
     [](CommandLine& l, const std::string& v) {
       l.metrics_set = true;
       if (v == "off")
         l.config.metrics.reset();
       else
         l.config.metrics = parse_metrics_address(v);
     }},
    {"--tls", "MODE",
     "NBD over TLS (STARTTLS): off, on (offered; exports without tls=require also take plaintext) or require "
     "(nothing but STARTTLS before TLS) (default off; wins over [tls] mode)",
     [](CommandLine& l, const std::string& v) {
       l.config.tls.mode = parse_tls_mode_setting(v, "--tls");
       l.tls_mode_set = true;
     }},
    {"--tls-certificates", "DIR",
     "X.509 credentials: DIR holds ca-cert.pem, server-cert.pem and server-key.pem (the layout of nbdkit and "
     "qemu; ca-crl.pem if present)",
     [](CommandLine& l, const std::string& v) {
       if (v.empty()) throw ConfigError("--tls-certificates needs a directory");
       l.config.tls.certificates_dir = v;
     }},
    {"--tls-psk", "FILE", "pre-shared keys: a psktool file of identity:hexkey lines",
     [](CommandLine& l, const std::string& v) {
       if (v.empty()) throw ConfigError("--tls-psk needs a file");
       l.config.tls.psk_file = v;
     }},
    {"--tls-priority", "STRING",
     "the GnuTLS priority string: which TLS versions, key exchanges and ciphers are offered, in which order "
     "(default: NORMAL with AES-128-GCM first, in the server's order; wins over [tls] priority)",
     [](CommandLine& l, const std::string& v) {
       if (v.empty()) throw ConfigError("--tls-priority needs a GnuTLS priority string (e.g. NORMAL)");
       l.config.tls.priority = v;
     }},
    {"--tls-verify-peer", "",
     "ask every TLS client for a certificate signed by ca-cert.pem and refuse those without one",
     [](CommandLine& l, const std::string&) { l.config.tls.verify_peer = true; }},
    {"--version", "", "print the version",
     [](CommandLine& l, const std::string&) { l.action = CommandLine::Action::version; }},
    {"--help", "", "this text", [](CommandLine& l, const std::string&) { l.action = CommandLine::Action::help; }},
    {"--help-man", "SECTION",
     "print a section of the man pages in scdoc, made from these tables: options, uris, export-options, "
     "fuse-options or exit-status (used by the build)",
     [](CommandLine& l, const std::string& v) {
       l.action = CommandLine::Action::help_man;
       l.man_section = v;
     }},
};

const std::pair<DaemonExit, std::string_view> kExits[] = {
    {kExitStopped, "stopped after SIGTERM or SIGINT (with --stdio: when the client left)"},
    {kExitFatal, "an error while running"},
    {kExitConfig, "a configuration mistake: a flag, the file, a URI or an option; or no export could be opened "
                  "(one that cannot while others can is served as failed and retried)"},
};

constexpr size_t kColumn = 25;  // where the help text of a flag, URI or option starts

constexpr size_t kWidth = 79;   // where lines wrap

// "  NAME  help" with the help at kColumn, its further lines under it: at
// each '\n' in `help`, and where a line would pass kWidth.
void entry(std::string& out, std::string_view name, std::string_view help, size_t indent = 2) {
  std::string line(indent, ' ');
  line += name;
  if (line.size() + 1 > kColumn) {
    out += line + "\n";
    line.clear();
  }
  line.resize(kColumn, ' ');
  bool first = true;
  while (!help.empty()) {
    const auto space = help.find_first_of(" \n");
    const std::string_view word = help.substr(0, space);
    if (!first && line.size() + 1 + word.size() > kWidth) {
      out += line + "\n";
      line.assign(kColumn, ' ');
      first = true;
    }
    if (!first) line += ' ';
    line += word;
    first = false;
    if (space == std::string_view::npos) break;
    if (help[space] == '\n') {
      out += line + "\n";
      line.assign(kColumn, ' ');
      first = true;
    }
    help = help.substr(space + 1);
  }
  out += line + "\n";
}

void option_entries(std::string& out, std::span<const core::OptionSpec> specs) {
  for (const auto& s : specs) entry(out, s.usage(), s.describe(), 4);
}

std::string join_schemes(const remote::Backend& b) {
  std::string out;
  for (auto s : b.schemes) out += (out.empty() ? "" : " and ") + std::string(s) + "://";
  return out;
}

}  // namespace

CommandLine parse_command_line(const std::vector<std::string>& args) {
  CommandLine line;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i], value;
    bool has_value = false;
    if (auto eq = arg.find('='); arg.starts_with("--") && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    if (arg == "-h") arg = "--help";
    const Flag* flag = nullptr;
    for (const auto& f : kFlags)
      if (f.name == arg) flag = &f;
    if (flag == nullptr) throw ConfigError("unknown argument '" + args[i] + "' (see --help)");
    if (!flag->value.empty() && !has_value) {
      if (i + 1 >= args.size()) throw ConfigError(arg + " needs a value");
      value = args[++i];
    }
    flag->apply(line, value);
    if (line.action != CommandLine::Action::run) return line;
  }
  return line;
}

DaemonConfig effective_config(CommandLine line) {
  DaemonConfig cfg = std::move(line.config);
  if (!line.config_file.empty()) {
    DaemonConfig from_file;
    load_config_file(line.config_file, from_file);
    const DaemonConfig defaults;
    // Command-line values win; exports from both places are served.
    from_file.exports.insert(from_file.exports.end(), cfg.exports.begin(), cfg.exports.end());
    if (cfg.stdio_export) from_file.stdio_export = cfg.stdio_export;
    if (!cfg.default_export.empty()) from_file.default_export = cfg.default_export;
    if (cfg.threads) from_file.threads = cfg.threads;
    if (cfg.blocking_threads != defaults.blocking_threads) from_file.blocking_threads = cfg.blocking_threads;
    if (cfg.max_inflight_bytes != defaults.max_inflight_bytes) from_file.max_inflight_bytes = cfg.max_inflight_bytes;
    if (cfg.max_request_bytes != defaults.max_request_bytes) from_file.max_request_bytes = cfg.max_request_bytes;
    if (cfg.remote_bandwidth != defaults.remote_bandwidth) from_file.remote_bandwidth = cfg.remote_bandwidth;
    if (!cfg.data_dir.empty()) from_file.data_dir = cfg.data_dir;
    if (cfg.handshake_timeout != defaults.handshake_timeout) from_file.handshake_timeout = cfg.handshake_timeout;
    if (cfg.shutdown_timeout != defaults.shutdown_timeout) from_file.shutdown_timeout = cfg.shutdown_timeout;
    if (!cfg.pid_file.empty()) from_file.pid_file = cfg.pid_file;
    if (cfg.fuse) {  // the command line's directory; its options over the file's
      if (!from_file.fuse) from_file.fuse.emplace();
      from_file.fuse->mountpoint = cfg.fuse->mountpoint;
      for (const auto& [k, v] : cfg.fuse->options) from_file.fuse->options[k] = v;
    }
    if (cfg.log_level != defaults.log_level) from_file.log_level = cfg.log_level;
    if (cfg.log_format != defaults.log_format) from_file.log_format = cfg.log_format;
    if (!cfg.control_socket.empty()) from_file.control_socket = cfg.control_socket;
    if (!cfg.control_socket_group.empty()) from_file.control_socket_group = cfg.control_socket_group;
    if (cfg.socket_mode) from_file.socket_mode = cfg.socket_mode;
    if (!cfg.socket_user.empty()) from_file.socket_user = cfg.socket_user;
    if (!cfg.socket_group.empty()) from_file.socket_group = cfg.socket_group;
    if (line.metrics_set) from_file.metrics = cfg.metrics;
    if (line.tls_mode_set) from_file.tls.mode = cfg.tls.mode;
    if (!cfg.tls.certificates_dir.empty()) from_file.tls.certificates_dir = cfg.tls.certificates_dir;
    if (!cfg.tls.psk_file.empty()) from_file.tls.psk_file = cfg.tls.psk_file;
    if (cfg.tls.verify_peer) from_file.tls.verify_peer = true;
    if (!cfg.tls.priority.empty()) from_file.tls.priority = cfg.tls.priority;
    cfg = std::move(from_file);
  }
  if (!line.listen.empty()) cfg.listen = line.listen;
  cfg.embedded_default = line.config_file.empty() && cfg.exports.empty() && !cfg.stdio_export;
  cfg.validate();
  return cfg;
}

std::vector<std::pair<std::string_view, std::string_view>> flags() {
  std::vector<std::pair<std::string_view, std::string_view>> out;
  for (const auto& f : kFlags) out.emplace_back(f.name, f.value);
  return out;
}

std::vector<FlagHelp> flag_help() {
  std::vector<FlagHelp> out;
  for (const auto& f : kFlags) out.push_back({f.name, f.value, f.help});
  return out;
}

std::vector<std::pair<int, std::string_view>> exit_codes() {
  std::vector<std::pair<int, std::string_view>> out;
  for (const auto& [code, meaning] : kExits) out.emplace_back(code, meaning);
  return out;
}

std::string usage() {
  std::string out =
      "Usage: blockwayd [OPTIONS]\n\n"
      "Serves disk images as NBD exports (and as files in a FUSE mount).\n\n";
  for (const auto& f : kFlags)
    entry(out, f.value.empty() ? std::string(f.name) : std::string(f.name) + " " + std::string(f.value), f.help);
  out +=
      "\nWith no --config, --export or --stdio it serves its embedded default: a sparse\n"
      "1 GiB demo image as export \"demo\" on localhost:10809.\n"
      "\nExport URIs (--export, --stdio, or uri in an [[export]] table):\n";
  for (const auto& b : remote::backends()) {
    for (size_t i = 0; i + 1 < b.uri_forms.size(); ++i) out += "  " + std::string(b.uri_forms[i]) + "\n";
    entry(out, b.uri_forms.back(), b.summary);
  }
  entry(out, "clone:BASE", "a copy-on-write clone of the export BASE (overlay options below)");
  out +=
      "\nExport options (--export NAME=URI,OPTION=VALUE,... or keys of [[export]]).\n"
      "SECONDS take decimals (2.5); a SIZE takes a binary suffix (64k, 32M, 1G, 2T).\n"
      "  every export:\n";
  option_entries(out, ExportConfig::generic_options());
  option_entries(out, core::QosLimits::options());
  out += "  with a cache (cache=DIR):\n";
  option_entries(out, cache::CacheConfig::options());
  out += "  a clone (clone:BASE):\n";
  option_entries(out, cache::OverlayConfig::options());
  for (const auto& b : remote::backends()) {
    if (b.options.empty() && !b.retry()) continue;
    out += "  " + join_schemes(b) + ":\n";
    option_entries(out, b.options);
    if (b.retry()) option_entries(out, std::span(&core::RetryOptions::kTimeoutOption, 1));
  }
  out += "\nFUSE options (--fuse-mount DIR,OPTION=VALUE,... or keys of [fuse]):\n";
  option_entries(out, fuse::FuseOptions::options());
  out += "\nExit codes:\n";
  for (const auto& [code, meaning] : kExits) out += "  " + std::to_string(code) + "  " + std::string(meaning) + "\n";
  return out;
}

}  // namespace blockway::gateway
