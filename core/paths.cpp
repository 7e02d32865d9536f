#include "core/paths.hpp"

#include <unistd.h>

#include <cstdlib>

namespace blockway::core {
namespace {

// systemd names a service's StateDirectory= and RuntimeDirectory= in
// $STATE_DIRECTORY / $RUNTIME_DIRECTORY (colon-separated, the first is
// ours). The packaged unit runs as the unprivileged blockway user, whose
// defaults would otherwise lie in its home directory.
std::string systemd_directory(const char* variable) {
  const char* v = std::getenv(variable);
  if (!v || *v != '/') return {};
  std::string dir(v);
  return dir.substr(0, dir.find(':'));
}

}  // namespace

std::string default_data_dir() {
  if (auto dir = systemd_directory("STATE_DIRECTORY"); !dir.empty()) return dir;
  if (geteuid() == 0) return "/var/lib/blockway";
  if (const char* x = std::getenv("XDG_DATA_HOME"); x && *x) return std::string(x) + "/blockway";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.local/share/blockway";
  return "/var/tmp/blockway";
}

std::string default_control_socket() {
  if (auto dir = systemd_directory("RUNTIME_DIRECTORY"); !dir.empty()) return dir + "/control.sock";
  if (geteuid() == 0) return "/run/blockway/control.sock";
  if (const char* x = std::getenv("XDG_RUNTIME_DIR"); x && *x) return std::string(x) + "/blockway/control.sock";
  return default_data_dir() + "/control.sock";
}

}  // namespace blockway::core
