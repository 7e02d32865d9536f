// FuseOptions: the [fuse] keys and --fuse-mount options, and their table
// (the one that validates them and prints them for --help).
//
// Thread model: plain values, parsed once at start-up and copied into the
// front end, which only reads them afterwards.
#pragma once

#include "core/options.hpp"

#include <chrono>
#include <map>
#include <span>
#include <string>
#include <sys/types.h>

namespace blockway::fuse {

struct FuseOptions {
  mode_t mode = 0644;       // permission bits of writable exports' files (read-only: & 0444)
  uid_t uid = 0;            // owner of the files (default: the daemon's user)
  gid_t gid = 0;
  bool allow_other = false;  // let other users than the daemon's reach the mount
  bool direct_io = false;    // FOPEN_DIRECT_IO: bypass the kernel page cache
  unsigned readers = 1;      // event loops that read /dev/fuse (at most one per loop)
  std::chrono::milliseconds shutdown_timeout{30000};  // how long open files keep a detached mount served
  // How long mount() waits for the directory to answer (a hung FUSE mount
  // there never does): then it fails instead of waiting on.
  std::chrono::milliseconds mount_timeout{10000};

  // From [fuse] keys or --fuse-mount options. Throws core::ConfigError.
  static FuseOptions parse(const std::map<std::string, std::string>& options);
  // Every FUSE option, for --help.
  static std::span<const core::OptionSpec> options();
};

}  // namespace blockway::fuse
