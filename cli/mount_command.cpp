// blockway mount DIR and blockway unmount: the daemon's FUSE front end.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <cstdio>

namespace blockway::cli {

int mount_command(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway mount DIR [--socket PATH]\n\n"
      "Mounts the daemon's FUSE front end at DIR (created if missing): every export\n"
      "appears there as a regular file named after it. A stale mount left at DIR by\n"
      "a crashed daemon is cleaned first; a live one is refused. Options (mode, uid,\n"
      "allow-other, direct-io...) come from the daemon's [fuse] settings.";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 1, usage);
  // The daemon has its own working directory: send an absolute path.
  const std::string dir = std::filesystem::absolute(a.positional[0]).lexically_normal().string();
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("mount", {{"dir", dir}});
  if (a.has("--json")) return print_json(r), kOk;
  std::printf("exports mounted at %s\n", str(r, "mountpoint", dir).c_str());
  return kOk;
}

int unmount_command(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway unmount [--socket PATH]\n\n"
      "Unmounts the daemon's FUSE front end. Files still open keep being served until\n"
      "they are closed (or the daemon's shutdown timeout ends); NBD is not affected.";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 0, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("unmount", Json::object());
  if (a.has("--json")) return print_json(r), kOk;
  std::printf("unmounted %s\n", str(r, "mountpoint", "").c_str());
  return kOk;
}

}  // namespace blockway::cli
