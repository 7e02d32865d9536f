#include "core/paths.hpp"

#include <unistd.h>

#include <cstdlib>

namespace blockway::core {

std::string default_data_dir() {
  if (geteuid() == 0) return "/var/lib/blockway";
  if (const char* x = std::getenv("XDG_DATA_HOME"); x && *x) return std::string(x) + "/blockway";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.local/share/blockway";
  return "/var/tmp/blockway";
}

std::string default_control_socket() {
  if (geteuid() == 0) return "/run/blockway/control.sock";
  if (const char* x = std::getenv("XDG_RUNTIME_DIR"); x && *x) return std::string(x) + "/blockway/control.sock";
  return default_data_dir() + "/control.sock";
}

}  // namespace blockway::core
