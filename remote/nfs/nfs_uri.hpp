// NfsTarget: what an nfs:// URI names, validated without touching the network.
//
//   nfs://SERVER[:PORT]/PATH/TO/IMAGE[?version=3|4]
//
// The directory that holds the image is what gets mounted and the image is
// opened inside it, as nfs-cp (libnfs's nfs_parse_url_full) and qemu's nfs
// driver split the path: nfs://srv/a/b/disk.img mounts "/a/b" and opens
// "/disk.img". With NFSv3 that directory is an exported path on the server
// (or, where the server allows it as nfs-ganesha does, a directory inside
// one); with NFSv4 it is a path in the server's pseudo filesystem (ganesha's
// `Pseudo`), looked up from the pseudo root.
//
// PORT is the NFS port (libnfs's nfsport=); without it NFSv3 asks the
// server's portmapper and NFSv4 uses 2049. NFSv3 always asks the portmapper
// for the MOUNT service.
//
// Pure value type, no threads.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace blockway::remote::nfs {

struct NfsTarget {
  std::string server;               // host name or address, without brackets
  std::optional<uint16_t> port;     // NFS port, if given
  int version = 3;                  // 3 or 4
  std::string mount_path;           // "/a/b": the directory that is mounted
  std::string file;                 // "/disk.img": the image, relative to the mount
  // Throws BackendError (registry.hpp) with a message that quotes the URI and
  // says what is wrong and what is expected.
  static NfsTarget parse(std::string_view uri);
  // The settings for libnfs's URL parser (version, nfsport), as a URL that
  // names no path: "nfs://SERVER/?version=4&nfsport=2049".
  [[nodiscard]] std::string libnfs_settings_url() const;
};

}  // namespace blockway::remote::nfs
