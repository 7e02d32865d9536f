// Daemon configuration: the TOML file, the command line, and their checks.
//
// Everything here runs once at start-up on the main thread and reports
// mistakes by throwing ConfigError with a message that names the setting.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace blockway::gateway {

struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ListenAddress {
  enum class Kind { tcp, unix_socket };
  Kind kind = Kind::tcp;
  std::string host;  // tcp: IPv4/IPv6 literal or host name, without brackets
  uint16_t port = 0;
  std::string path;  // unix socket path

  // "HOST:PORT", "[V6]:PORT", ":PORT" (all addresses), "unix:/path".
  static ListenAddress parse(std::string_view text);
  [[nodiscard]] std::string to_string() const;
};

struct ExportConfig {
  std::string name;
  std::string uri;
  std::string description;
  bool read_only = false;
  // Options not understood by the generic export code (backend, cache, ...),
  // each consumed by the part that knows it; leftovers are an error.
  std::map<std::string, std::string> options;

  // "NAME=URI[,key=value|flag]..." as given to --export.
  static ExportConfig parse_spec(std::string_view spec);
};

// The FUSE mount ([fuse] in the file, --fuse-mount on the command line).
// Options (mode, uid, gid, allow-other, direct-io) are checked by fuse/.
struct FuseMountConfig {
  std::string mountpoint;
  std::map<std::string, std::string> options;

  // "DIR[,key=value...]" as given to --fuse-mount.
  static FuseMountConfig parse_spec(std::string_view spec);
};

struct DaemonConfig {
  std::vector<ListenAddress> listen;
  std::vector<ExportConfig> exports;
  std::optional<ExportConfig> stdio_export;  // --stdio: one client on stdin/stdout
  std::string default_export;
  unsigned threads = 0;            // event loops; 0 = one per core
  unsigned blocking_threads = 16;  // pool for calls that may block
  std::string data_dir;
  std::string log_level = "info";
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
  uint64_t max_inflight_bytes = 128ull << 20;  // per connection
  uint32_t max_request_bytes = 32u << 20;      // largest read/write payload
  std::chrono::milliseconds handshake_timeout{10000};
  std::chrono::milliseconds shutdown_timeout{30000};
  std::optional<FuseMountConfig> fuse;  // each export as a file under a mount directory
  bool embedded_default = false;  // no config and no exports: serve the demo image

  void validate() const;
};

// Parses "64k", "32M", "1G", "4096" (binary units). Throws ConfigError naming `what`.
uint64_t parse_size(std::string_view text, std::string_view what);
bool parse_bool(std::string_view text, std::string_view what);

// Reads a TOML file into `cfg` (fields it names replace the defaults).
void load_config_file(const std::string& path, DaemonConfig& cfg);

// The default data directory: /var/lib/blockway for root, else
// $XDG_DATA_HOME/blockway or ~/.local/share/blockway.
std::string default_data_dir();

// The default control socket, the same for blockwayd and blockway:
// /run/blockway/control.sock for root, else $XDG_RUNTIME_DIR/blockway/
// control.sock, else control.sock in default_data_dir().
std::string default_control_socket();

// The group id of [control] group or --control-group (a group name or a
// number). Throws ConfigError naming the setting (`what`) if there is no such
// group.
unsigned control_group_id(const std::string& group, const std::string& what = "control.group");

}  // namespace blockway::gateway
