#include "gateway/config.hpp"

#include "core/access_policy.hpp"
#include "core/user_lookup.hpp"

#include <fmt/format.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <set>
#include <vector>

namespace blockway::gateway {

using core::ConfigError;
using core::ListenAddress;
using core::parse_bool;
using core::parse_size;

namespace {

const core::OptionSpec kExportOptions[] = {
    {.name = "read-only",
     .kind = core::OptionKind::flag,
     .help = "serve the export read-only (default off; a bare ro means on)",
     .aliases = {"ro", "readonly"}},
    {.name = "description", .kind = core::OptionKind::text, .help = "what NBD clients are told it is", .value = "TEXT"},
    {.name = "tls",
     .kind = core::OptionKind::text,
     .help = "NBD clients must use TLS for this export even where the server allows plaintext "
             "(needs --tls on or require)",
     .value = "require"},
    {.name = "allow",
     .kind = core::OptionKind::text,
     .help = "who may use the export over NBD, entries separated by spaces or ';': IPv4/IPv6 addresses and "
             "CIDRs, cert:NAME (client certificate CN), psk:NAME (TLS PSK identity), user:NAME|UID and "
             "group:NAME|GID (Unix socket peers); others are told it does not exist (default: everyone)",
     .value = "RULES"},
    {.name = "listen",
     .kind = core::OptionKind::text,
     .help = "publish the export only on these named listeners (--listen NAME=ADDR), separated by spaces or "
             "';' (default: on every listener)",
     .value = "NAMES"},
    {.name = "fuse-uid",
     .kind = core::OptionKind::text,
     .help = "owner of the export's file in the FUSE mount, a user name or uid (default: the mount's uid=)",
     .value = "USER"},
    {.name = "fuse-gid",
     .kind = core::OptionKind::text,
     .help = "group of the export's file in the FUSE mount, a group name or gid (default: the mount's gid=)",
     .value = "GROUP"},
    {.name = "fuse-mode",
     .kind = core::OptionKind::octal,
     .help = "permission bits of the export's file in the FUSE mount (default: the mount's mode=; read-only "
             "exports & 0444)",
     .min = 0,
     .max = 0777},
};
const core::OptionSpec& kReadOnly = kExportOptions[0];
const core::OptionSpec& kDescription = kExportOptions[1];
const core::OptionSpec& kTls = kExportOptions[2];
const core::OptionSpec& kAllow = kExportOptions[3];
const core::OptionSpec& kListenOn = kExportOptions[4];
const core::OptionSpec& kFuseUid = kExportOptions[5];
const core::OptionSpec& kFuseGid = kExportOptions[6];
const core::OptionSpec& kFuseMode = kExportOptions[7];

bool names(const core::OptionSpec& spec, const std::string& key) {
  return key == spec.name || std::find(spec.aliases.begin(), spec.aliases.end(), key) != spec.aliases.end();
}

// Applies one generic export key; returns false if the key is not generic.
bool apply_export_key(ExportConfig& e, const std::string& key, const std::string& value) {
  if (names(kReadOnly, key)) {
    e.read_only = value.empty() ? true : parse_bool(value, "export '" + e.name + "': option " + key);
  } else if (names(kDescription, key)) {
    e.description = value;
  } else if (names(kTls, key)) {
    if (value != "require" && value != "off")
      throw ConfigError("export '" + e.name + "': option tls='" + value + "': the value is require (or off)");
    e.tls_required = value == "require";
  } else if (names(kAllow, key) || names(kListenOn, key)) {
    try {
      (void)core::AccessPolicy::parse(key == "allow" ? value : "", key == "listen" ? value : "");
    } catch (const ConfigError& err) {
      throw ConfigError("export '" + e.name + "': " + err.what());
    }
    (key == "allow" ? e.allow : e.listen_on) = value;
  } else if (names(kFuseUid, key)) {
    e.fuse.uid = parse_fuse_uid(e.name, value);
  } else if (names(kFuseGid, key)) {
    e.fuse.gid = parse_fuse_gid(e.name, value);
  } else if (names(kFuseMode, key)) {
    e.fuse.mode = parse_fuse_mode(e.name, value);
  } else {
    return false;
  }
  return true;
}

void check_export_name(const std::string& name, std::string_view where) {
  if (name.empty()) throw ConfigError(std::string(where) + ": export name is empty");
  if (name.size() > 4096) throw ConfigError(std::string(where) + ": export name is too long");
  // CLONE@SNAP names a clone's snapshot export: a user's name must not take it.
  if (name.find('@') != std::string::npos)
    throw ConfigError(std::string(where) + ": export name '" + name +
                      "' must not contain '@' (CLONE@SNAP names a clone's snapshot)");
}

}  // namespace

std::span<const core::OptionSpec> ExportConfig::generic_options() { return kExportOptions; }

uid_t parse_fuse_uid(const std::string& export_name, const std::string& value) {
  const auto uid = core::find_user(value);
  if (!uid) throw ConfigError("export '" + export_name + "': option fuse-uid='" + value + "': no such user");
  return *uid;
}

gid_t parse_fuse_gid(const std::string& export_name, const std::string& value) {
  const auto gid = core::find_group(value);
  if (!gid) throw ConfigError("export '" + export_name + "': option fuse-gid='" + value + "': no such group");
  return *gid;
}

mode_t parse_fuse_mode(const std::string& export_name, const std::string& value) {
  return static_cast<mode_t>(
      core::parse_number(value, "export '" + export_name + "': option fuse-mode", kFuseMode.min, kFuseMode.max, 8));
}

// "fuse-uid=1000,fuse-gid=,fuse-mode=0640": every key, empty where unset
// (the mount's), numbers rather than names (a renamed user keeps the file).
std::string saved_fuse_attrs(const core::FileAttrs& attrs) {
  const auto number = [](const auto& v) { return v ? std::to_string(*v) : std::string(); };
  return "fuse-uid=" + number(attrs.uid) + ",fuse-gid=" + number(attrs.gid) +
         ",fuse-mode=" + (attrs.mode ? fmt::format("{:04o}", *attrs.mode) : std::string());
}

core::FileAttrs fuse_attrs_from_saved(const std::string& export_name, const std::string& saved) {
  core::FileAttrs attrs;
  for (size_t pos = 0; pos < saved.size();) {
    const size_t end = std::min(saved.find(',', pos), saved.size());
    const std::string item = saved.substr(pos, end - pos);
    pos = end + 1;
    const auto eq = item.find('=');
    const std::string key = item.substr(0, eq);
    const std::string value = eq == std::string::npos ? std::string() : item.substr(eq + 1);
    if (value.empty()) continue;
    if (key == "fuse-uid") attrs.uid = parse_fuse_uid(export_name, value);
    else if (key == "fuse-gid") attrs.gid = parse_fuse_gid(export_name, value);
    else if (key == "fuse-mode") attrs.mode = parse_fuse_mode(export_name, value);
    else throw ConfigError("export '" + export_name + "': saved FUSE attributes '" + saved + "': unknown key '" + key + "'");
  }
  return attrs;
}

FuseMountConfig FuseMountConfig::parse_spec(std::string_view spec) {
  const std::string where = "--fuse-mount '" + std::string(spec) + "'";
  FuseMountConfig f;
  const auto comma = spec.find(',');
  f.mountpoint = std::string(spec.substr(0, comma));
  if (f.mountpoint.empty()) throw ConfigError(where + ": expected DIR[,option=value...]");
  std::string_view rest = comma == std::string_view::npos ? std::string_view{} : spec.substr(comma + 1);
  while (!rest.empty()) {
    const auto next = rest.find(',');
    const std::string_view item = rest.substr(0, next);
    const auto eq = item.find('=');
    if (item.empty()) throw ConfigError(where + ": empty option");
    if (eq == std::string_view::npos)
      f.options[std::string(item)] = "on";  // a bare flag: allow-other, direct-io
    else
      f.options[std::string(item.substr(0, eq))] = std::string(item.substr(eq + 1));
    if (next == std::string_view::npos) break;
    rest = rest.substr(next + 1);
  }
  return f;
}

ExportConfig ExportConfig::parse_spec(std::string_view spec) {
  const std::string where = "--export '" + std::string(spec) + "'";
  const auto eq = spec.find('=');
  if (eq == std::string_view::npos) throw ConfigError(where + ": expected NAME=URI[,option=value...]");
  ExportConfig e;
  e.name = std::string(spec.substr(0, eq));
  check_export_name(e.name, where);
  std::string_view rest = spec.substr(eq + 1);
  bool first = true;
  while (true) {
    const auto comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    if (first) {
      e.uri = std::string(item);
      if (e.uri.empty()) throw ConfigError(where + ": the URI is empty");
      first = false;
    } else if (!item.empty()) {
      const auto ieq = item.find('=');
      const std::string key(item.substr(0, ieq));
      const std::string value = ieq == std::string_view::npos ? "" : std::string(item.substr(ieq + 1));
      if (!apply_export_key(e, key, value)) {
        if (e.options.contains(key)) throw ConfigError(where + ": option '" + key + "' given twice");
        e.options[key] = value;
      }
    }
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  return e;
}

void DaemonConfig::validate() const {
  std::set<std::string> names;
  for (const auto& e : exports) {
    if (!names.insert(e.name).second) throw ConfigError("export '" + e.name + "' is defined twice");
  }
  if (!default_export.empty() && !names.contains(default_export) &&
      !(stdio_export && stdio_export->name == default_export))
    throw ConfigError("default-export '" + default_export + "' names no export");
  if (max_request_bytes < 4096 || max_request_bytes > (256u << 20))
    throw ConfigError("max-request must be between 4k and 256M");
  // Below max-request is fine: one request is always admitted, however large.
  if (max_inflight_bytes < 4096) throw ConfigError("max-inflight must be at least 4k");
  static const std::set<std::string> levels{"trace", "debug", "info", "warn", "error", "critical", "off"};
  if (!levels.contains(log_level))
    throw ConfigError("log-level '" + log_level + "' is not one of trace, debug, info, warn, error, off");
  if (threads > 256) throw ConfigError("threads must be at most 256");
  using std::chrono::hours;
  if (handshake_timeout < std::chrono::seconds(1) || handshake_timeout > hours(1))
    throw ConfigError("handshake-timeout must be between 1 second and 1 hour");
  if (shutdown_timeout.count() < 0 || shutdown_timeout > hours(24))
    throw ConfigError("shutdown-timeout must be at most 24 hours");
  if (!control_socket.empty() && control_socket != "off" &&
      (control_socket.front() != '/' || control_socket.size() >= 108))
    throw ConfigError("control socket '" + control_socket + "' must be an absolute path shorter than 108 bytes");
  if (tls.mode == nbd::TlsMode::off && (!tls.certificates_dir.empty() || !tls.psk_file.empty()))
    throw ConfigError("TLS credentials are given but tls is off: add --tls=on or --tls=require");
  if (tls.mode == nbd::TlsMode::off && !tls.priority.empty())
    throw ConfigError("a TLS priority is given but tls is off: add --tls=on or --tls=require");
  if (tls.mode != nbd::TlsMode::off && tls.certificates_dir.empty() && tls.psk_file.empty())
    throw ConfigError(std::string("--tls=") + nbd::to_string(tls.mode) +
                      " needs --tls-certificates DIR or --tls-psk FILE");
  if (tls.verify_peer && tls.certificates_dir.empty())
    throw ConfigError("tls-verify-peer needs --tls-certificates DIR (its ca-cert.pem checks the clients)");
  const bool socket_access = socket_mode || !socket_user.empty() || !socket_group.empty();
  const auto is_unix = [](const ListenAddress& l) { return l.kind == ListenAddress::Kind::unix_socket; };
  if (socket_access && !listen.empty() && std::none_of(listen.begin(), listen.end(), is_unix))
    throw ConfigError("socket-mode, socket-user and socket-group apply to Unix listeners, and none is configured "
                      "(add --listen unix:/PATH)");
  std::set<std::string> listeners;
  for (const auto& l : listen)
    if (!l.name.empty() && !listeners.insert(l.name).second)
      throw ConfigError("listener name '" + l.name + "' is used twice");
  // Without --listen the listeners come from systemd (their names from
  // FileDescriptorName=), known only at start.
  for (const auto& e : exports) {
    const auto policy = core::AccessPolicy::parse("", e.listen_on);
    for (const auto& name : policy.listeners())
      if (!listen.empty() && !listeners.contains(name))
        throw ConfigError("export '" + e.name + "': listen=" + name + " names no listener (use --listen " + name +
                          "=ADDR)");
  }
  for (const auto& e : exports)
    if (e.tls_required && tls.mode == nbd::TlsMode::off)
      throw ConfigError("export '" + e.name + "' has tls=require but TLS is off: add --tls=on");
  if (blocking_threads == 0 || blocking_threads > 1024)
    throw ConfigError("blocking-threads must be between 1 and 1024");
}

void load_config_file(const std::string& path, DaemonConfig& cfg) {
  toml::table root;
  try {
    root = toml::parse_file(path);
  } catch (const toml::parse_error& err) {
    const auto& where = err.source().begin;
    throw ConfigError(path + ":" + std::to_string(where.line) + ":" + std::to_string(where.column) +
                      ": " + std::string(err.description()));
  }
  // A value as the text the option readers take. Floating-point numbers only
  // where seconds (which take decimals) can be: the timeouts, and the
  // options of an [[export]] or [fuse] table, whose readers check them.
  auto as_string = [&](const toml::node& n, const std::string& key, bool decimals = false) -> std::string {
    if (auto v = n.value<std::string>()) return *v;
    if (n.is_integer()) return std::to_string(*n.value<int64_t>());
    if (auto b = n.value<bool>()) return *b ? "on" : "off";
    if (auto d = n.value<double>(); d && decimals) {
      char buf[64];
      auto [end, ec] = std::to_chars(buf, buf + sizeof buf, *d);
      if (ec == std::errc{}) return std::string(buf, end);
    }
    throw ConfigError(path + ": '" + key + "' must be a string, number or boolean");
  };
  // "0660" (a string read as octal) or 0o660 (a TOML integer).
  auto file_mode = [&](const toml::node& n, const std::string& key) -> unsigned {
    if (auto i = n.value<int64_t>(); i && !n.is_string()) {
      if (*i < 0 || *i > 0777)
        throw ConfigError(path + ": " + key + " " + std::to_string(*i) + " is not a file mode like \"0660\" or 0o660");
      return static_cast<unsigned>(*i);
    }
    return parse_socket_mode(as_string(n, key), path + ": " + key);
  };
  for (const auto& [k, node] : root) {
    const std::string key(k.str());
    if (key == "socket-mode") {
      cfg.socket_mode = file_mode(node, key);
    } else if (key == "socket-user") {
      cfg.socket_user = as_string(node, key);
      (void)socket_user_id(cfg.socket_user, path + ": socket-user");
    } else if (key == "socket-group") {
      cfg.socket_group = as_string(node, key);
      (void)socket_group_id(cfg.socket_group, path + ": socket-group");
    } else if (key == "listen") {
      cfg.listen.clear();
      auto* arr = node.as_array();
      if (!arr) throw ConfigError(path + ": 'listen' must be an array of strings");
      for (const auto& item : *arr) cfg.listen.push_back(ListenAddress::parse(as_string(item, key)));
    } else if (key == "control") {
      auto* t = node.as_table();
      if (!t) throw ConfigError(path + ": 'control' must be a table ([control])");
      for (const auto& [ck, cnode] : *t) {
        const std::string ckey(ck.str());
        if (ckey == "socket") {
          cfg.control_socket = as_string(cnode, "control.socket");
          if (cfg.control_socket.empty())
            throw ConfigError(path + ": control.socket is empty (use \"off\" to disable the control socket)");
        } else if (ckey == "mode") {
          cfg.control_socket_mode = file_mode(cnode, "control.mode");
          cfg.control_socket_mode_set = true;
        } else if (ckey == "group") {
          cfg.control_socket_group = as_string(cnode, "control.group");
          (void)control_group_id(cfg.control_socket_group);  // an unknown group stops the start here
        } else {
          throw ConfigError(path + ": unknown setting 'control." + ckey + "'");
        }
      }
    } else if (key == "metrics") {
      auto* t = node.as_table();
      if (!t) throw ConfigError(path + ": use a [metrics] table for the metrics endpoint");
      for (const auto& [mk, mnode] : *t) {
        const std::string mkey(mk.str());
        if (mkey != "listen") throw ConfigError(path + ": unknown setting 'metrics." + mkey + "'");
        const std::string value = as_string(mnode, "metrics.listen");
        if (value == "off")
          cfg.metrics.reset();
        else
          cfg.metrics = parse_metrics_address(value);
      }
    } else if (key == "tls") {
      auto* t = node.as_table();
      if (!t) throw ConfigError(path + ": use a [tls] table for TLS");
      for (const auto& [tk, tnode] : *t) {
        const std::string tkey(tk.str());
        const std::string value = as_string(tnode, "tls." + tkey);
        if (tkey == "mode")
          cfg.tls.mode = parse_tls_mode_setting(value, path + ": tls.mode");
        else if (tkey == "certificates")
          cfg.tls.certificates_dir = value;
        else if (tkey == "psk")
          cfg.tls.psk_file = value;
        else if (tkey == "verify-peer")
          cfg.tls.verify_peer = parse_bool(value, path + ": tls.verify-peer");
        else if (tkey == "priority") {
          if (value.empty()) throw ConfigError(path + ": tls.priority is empty (leave it out for the default)");
          cfg.tls.priority = value;
        }
        else
          throw ConfigError(path + ": unknown setting 'tls." + tkey + "'");
      }
    } else if (key == "export") {
      auto* arr = node.as_array();
      if (!arr) throw ConfigError(path + ": use [[export]] tables for exports");
      for (const auto& item : *arr) {
        auto* t = item.as_table();
        if (!t) throw ConfigError(path + ": every [[export]] must be a table");
        ExportConfig e;
        if (auto n = (*t)["name"].value<std::string>()) e.name = *n;
        check_export_name(e.name, path + ": [[export]]");
        if (auto u = (*t)["uri"].value<std::string>()) e.uri = *u;
        if (e.uri.empty()) throw ConfigError(path + ": export '" + e.name + "' has no uri");
        for (const auto& [ik, inode] : *t) {
          const std::string ikey(ik.str());
          if (ikey == "name" || ikey == "uri") continue;
          std::string value;
          if (auto* list = inode.as_array(); list && (ikey == "allow" || ikey == "listen")) {
            for (const auto& item : *list) value += (value.empty() ? "" : " ") + as_string(item, ikey);
          } else {
            value = as_string(inode, ikey, true);
          }
          if (!apply_export_key(e, ikey, value)) e.options[ikey] = value;
        }
        cfg.exports.push_back(std::move(e));
      }
    } else if (key == "device") {
      auto* arr = node.as_array();
      if (!arr) throw ConfigError(path + ": use [[device]] tables for kernel devices");
      for (const auto& item : *arr) {
        auto* t = item.as_table();
        if (!t) throw ConfigError(path + ": every [[device]] must be a table");
        DeviceConfig d;
        for (const auto& [dk, dnode] : *t) {
          const std::string dkey(dk.str());
          if (dkey == "export")
            d.export_name = as_string(dnode, dkey);
          else
            d.options[dkey] = as_string(dnode, dkey, true);
        }
        if (d.export_name.empty()) throw ConfigError(path + ": a [[device]] has no export");
        cfg.devices.push_back(std::move(d));
      }
    } else if (key == "fuse") {
      auto* t = node.as_table();
      if (!t) throw ConfigError(path + ": use a [fuse] table for the FUSE mount");
      FuseMountConfig f;
      for (const auto& [fk, fnode] : *t) {
        const std::string fkey(fk.str());
        const std::string value = as_string(fnode, fkey, true);
        if (fkey == "mountpoint")
          f.mountpoint = value;
        else
          f.options[fkey] = value;
      }
      cfg.fuse = std::move(f);
    } else if (key == "threads") {
      cfg.threads = static_cast<unsigned>(core::parse_number(as_string(node, key), key, 0, UINT32_MAX));
    } else if (key == "blocking-threads") {
      cfg.blocking_threads = static_cast<unsigned>(core::parse_number(as_string(node, key), key, 0, UINT32_MAX));
    } else if (key == "data-dir") {
      cfg.data_dir = as_string(node, key);
    } else if (key == "log-level") {
      cfg.log_level = as_string(node, key);
    } else if (key == "log-format") {
      cfg.log_format = core::parse_log_format(as_string(node, key), key);
    } else if (key == "pid-file") {
      cfg.pid_file = as_string(node, key);
    } else if (key == "default-export") {
      cfg.default_export = as_string(node, key);
    } else if (key == "remote-bandwidth") {
      cfg.remote_bandwidth = parse_size(as_string(node, key), key);
    } else if (key == "max-inflight") {
      cfg.max_inflight_bytes = parse_size(as_string(node, key), key);
    } else if (key == "max-request") {
      const auto v = parse_size(as_string(node, key), key);
      if (v > UINT32_MAX) throw ConfigError("max-request is too large");
      cfg.max_request_bytes = static_cast<uint32_t>(v);
    } else if (key == "shutdown-timeout") {
      cfg.shutdown_timeout = core::parse_seconds(as_string(node, key, true), key);
    } else if (key == "handshake-timeout") {
      cfg.handshake_timeout = core::parse_seconds(as_string(node, key, true), key);
    } else {
      throw ConfigError(path + ": unknown setting '" + key + "'");
    }
  }
}

nbd::TlsMode parse_tls_mode_setting(const std::string& text, const std::string& what) {
  try {
    return nbd::parse_tls_mode(text);
  } catch (const std::invalid_argument& e) {
    throw ConfigError(what + ": " + e.what());
  }
}

ListenAddress parse_metrics_address(std::string_view text) {
  const std::string t(text);
  if (t.empty()) throw ConfigError("metrics address is empty (HOST:PORT, PORT or HOST)");
  ListenAddress a;
  if (t.find_first_not_of("0123456789") == std::string::npos)
    a = ListenAddress::parse("127.0.0.1:" + t);
  else if (t.find(':') == std::string::npos && t.front() != '[')
    a = ListenAddress::parse(t + ":" + std::to_string(kDefaultMetricsPort));
  else
    a = ListenAddress::parse(t);
  if (a.kind != ListenAddress::Kind::tcp)
    throw ConfigError("metrics address '" + t + "': the metrics endpoint listens on TCP only");
  if (a.port == 0) throw ConfigError("metrics address '" + t + "': port 0 is not a port");
  return a;
}

unsigned control_group_id(const std::string& group, const std::string& what) {
  if (group.empty()) throw ConfigError(what + " is empty (leave it out for a root-only socket)");
  return socket_group_id(group, what);
}

unsigned parse_socket_mode(const std::string& text, const std::string& what) {
  unsigned m = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), m, 8);
  if (text.empty() || ec != std::errc{} || end != text.data() + text.size() || m > 0777)
    throw ConfigError(what + " '" + text + "' is not a file mode like 0660 (octal, at most 0777)");
  return m;
}

uid_t socket_user_id(const std::string& user, const std::string& what) {
  if (user.empty()) throw ConfigError(what + " is empty (a user name or uid)");
  if (auto id = core::find_user(user)) return *id;
  throw ConfigError(what + " '" + user + "': no such user");
}

gid_t socket_group_id(const std::string& group, const std::string& what) {
  if (group.empty()) throw ConfigError(what + " is empty (a group name or gid)");
  if (auto id = core::find_group(group)) return *id;
  throw ConfigError(what + " '" + group + "': no such group");
}

core::UnixSocketAccess DaemonConfig::unix_socket_access() const {
  core::UnixSocketAccess a;
  if (!socket_user.empty()) a.uid = socket_user_id(socket_user, "socket-user");
  if (!socket_group.empty()) a.gid = socket_group_id(socket_group, "socket-group");
  // Like [control] group: a group is named so that its members may connect.
  a.mode = socket_mode ? std::optional<mode_t>(*socket_mode) : a.gid ? std::optional<mode_t>(0660) : std::nullopt;
  return a;
}

}  // namespace blockway::gateway
