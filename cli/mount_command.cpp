// blockway mount DIR and blockway unmount: the daemon's FUSE front end.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <cstdio>

#include <filesystem>

namespace blockway::cli {

int mount_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway mount DIR [--socket PATH]\n\n"
               "Mounts the daemon's FUSE front end at DIR (created if missing): every export\n"
               "appears there as a regular file named after it. A stale mount left at DIR by\n"
               "a crashed daemon is cleaned first; a live one is refused. Options (mode, uid,\n"
               "allow-other, direct-io...) come from the daemon's [fuse] settings.",
      .positionals = 1};
  // The daemon has its own working directory: send an absolute path.
  auto dir = [](const Args& a) { return std::filesystem::absolute(a.positional[0]).lexically_normal().string(); };
  command.request = [dir](const Args& a) { return Request("mount", {{"dir", dir(a)}}); };
  command.print = [dir](const Args& a, const Json& r) {
    std::printf("exports mounted at %s\n", str(r, "mountpoint", dir(a)).c_str());
  };
  return run_one_request(in, command);
}

int unmount_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway unmount [--socket PATH]\n\n"
               "Unmounts the daemon's FUSE front end. Files still open keep being served until\n"
               "they are closed (or the daemon's shutdown timeout ends); NBD is not affected."};
  command.request = [](const Args&) { return Request("unmount", Json::object()); };
  command.print = [](const Args&, const Json& r) { std::printf("unmounted %s\n", str(r, "mountpoint", "").c_str()); };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
