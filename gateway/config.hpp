// Daemon configuration: the TOML file, the command line, and their checks.
//
// Everything here runs once at start-up on the main thread and reports
// mistakes by throwing ConfigError with a message that names the setting.
#pragma once

#include "core/file_attrs.hpp"
#include "core/listen_address.hpp"
#include "core/logging.hpp"
#include "core/options.hpp"
#include "nbd/tls_context.hpp"

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace blockway::gateway {

struct ExportConfig {
  std::string name;
  std::string uri;
  std::string description;
  bool read_only = false;
  bool tls_required = false;  // tls=require
  std::string allow;          // allow=: who may use it over NBD (core::AccessPolicy)
  std::string listen_on;      // listen=: the named listeners it is published on
  // fuse-uid=, fuse-gid= (names resolved when parsed), fuse-mode=: its file
  // in the FUSE mount.
  core::FileAttrs fuse;
  // Options not understood by the generic export code (backend, cache, ...),
  // each consumed by the part that knows it; leftovers are an error.
  std::map<std::string, std::string> options;

  // "NAME=URI[,key=value|flag]..." as given to --export.
  static ExportConfig parse_spec(std::string_view spec);
  // The options every export takes (read-only, description), for --help;
  // the backend's, the RetryLayer's and the cache's are theirs.
  static std::span<const core::OptionSpec> generic_options();
};

// fuse-uid=, fuse-gid=, fuse-mode= of export NAME, as the configuration and
// `blockway access` take them: a user or group name or number, an octal
// mode up to 0777. ConfigError names the export and the option.
uid_t parse_fuse_uid(const std::string& export_name, const std::string& value);
gid_t parse_fuse_gid(const std::string& export_name, const std::string& value);
mode_t parse_fuse_mode(const std::string& export_name, const std::string& value);
// The form a run-time change is saved in ("fuse-uid=1000,fuse-gid=,
// fuse-mode=0640": every key, empty where unset, ids as numbers), and back.
std::string saved_fuse_attrs(const core::FileAttrs& attrs);
core::FileAttrs fuse_attrs_from_saved(const std::string& export_name, const std::string& saved);

// The FUSE mount ([fuse] in the file, --fuse-mount on the command line).
// Options (mode, uid, gid, allow-other, direct-io) are checked by fuse/.
struct FuseMountConfig {
  std::string mountpoint;
  std::map<std::string, std::string> options;

  // "DIR[,key=value...]" as given to --fuse-mount.
  static FuseMountConfig parse_spec(std::string_view spec);
};

// A kernel device to attach at start ([[device]] in the file): the export
// and the options `blockway connect` takes (device, connections, read-only,
// rotational, dead-conn-timeout, timeout), checked by device_commands.
struct DeviceConfig {
  std::string export_name;
  std::map<std::string, std::string> options;
};

struct DaemonConfig {
  std::vector<core::ListenAddress> listen;
  std::vector<ExportConfig> exports;
  std::optional<ExportConfig> stdio_export;  // --stdio: one client on stdin/stdout
  std::string default_export;
  unsigned threads = 0;            // event loops; 0 = one per core
  unsigned blocking_threads = 16;  // pool for calls that may block
  std::string data_dir;
  std::string log_level = "info";
  core::LogFormat log_format = core::LogFormat::text;  // --log-format, log-format
  std::string pid_file;
  // Control socket: empty = default_control_socket() (skipped with a warning
  // if another daemon already listens there); "off" = no control plane.
  std::string control_socket;
  unsigned control_socket_mode = 0600;
  bool control_socket_mode_set = false;  // [control] mode given
  // [control] group: the socket's group (a name or a number); with it the
  // mode defaults to 0660, so the group's members may use the control plane.
  std::string control_socket_group;
  [[nodiscard]] unsigned control_mode() const noexcept {
    return control_socket_mode_set || control_socket_group.empty() ? control_socket_mode : 0660;
  }
  // socket-mode / socket-user / socket-group: the NBD Unix listeners' file
  // mode and owner (checked when parsed; a group alone means mode 0660).
  std::optional<unsigned> socket_mode;
  std::string socket_user, socket_group;
  [[nodiscard]] core::UnixSocketAccess unix_socket_access() const;
  // Per connection. One request is always admitted, so it may be below
  // max_request_bytes. 4 MiB cut the daemon's CPU per GB of iSCSI/NFS
  // sequential reads by 13-27 % (issue 17: requests admitted past the
  // remote's own in-flight budget wait holding buffers that go cold); not
  // the default, since it would also leave an export read in 4 MiB
  // requests (RBD's preferred block) one request per connection.
  uint64_t max_inflight_bytes = 128ull << 20;
  uint64_t remote_bandwidth = 0;  // bytes per second to and from network remotes, all exports; 0 = no cap
  uint32_t max_request_bytes = 32u << 20;      // largest read/write payload
  std::chrono::milliseconds handshake_timeout{10000};
  std::chrono::milliseconds shutdown_timeout{30000};
  std::optional<FuseMountConfig> fuse;  // each export as a file under a mount directory
  std::vector<DeviceConfig> devices;     // [[device]]: kernel devices attached at start
  std::optional<core::ListenAddress> metrics;  // --metrics / [metrics] listen: the Prometheus endpoint
  nbd::TlsSettings tls;                        // --tls* / [tls]: NBD over TLS (STARTTLS)
  bool embedded_default = false;  // no config and no exports: serve the demo image

  void validate() const;
};

inline constexpr uint16_t kDefaultMetricsPort = 9110;

// --metrics / [metrics] listen: "HOST:PORT", "[V6]:PORT", "PORT" (on
// 127.0.0.1) or "HOST" (port 9110). ConfigError for anything else (a Unix
// socket, port 0, a malformed address).
core::ListenAddress parse_metrics_address(std::string_view text);

// --tls / [tls] mode: off, on or require; ConfigError naming `what` otherwise.
nbd::TlsMode parse_tls_mode_setting(const std::string& text, const std::string& what);

// Reads a TOML file into `cfg` (fields it names replace the defaults).
void load_config_file(const std::string& path, DaemonConfig& cfg);

// The group id of [control] group or --control-group (a group name or a
// number). Throws ConfigError naming the setting (`what`) if there is no such
// group.
unsigned control_group_id(const std::string& group, const std::string& what = "control.group");

// --socket-mode / socket-mode: an octal file mode ("0660", or a TOML integer
// read as octal digits); ConfigError naming `what` otherwise.
unsigned parse_socket_mode(const std::string& text, const std::string& what);
// socket-user / socket-group: the id of a user or group name or number;
// ConfigError naming `what` if there is none.
uid_t socket_user_id(const std::string& user, const std::string& what);
gid_t socket_group_id(const std::string& group, const std::string& what);

}  // namespace blockway::gateway
