// FileAttrs: an export's owner, group and permission bits for its file in
// the FUSE mount (fuse-uid=, fuse-gid=, fuse-mode=), parsed by the gateway's
// configuration and the control plane, read by the FUSE operations.
//
// Thread model: a plain value. An Export holds the current one behind an
// atomic shared_ptr, replaced whole on a run-time change.
#pragma once

#include <sys/types.h>

#include <optional>

namespace blockway::core {

// An export's own owner, group and permission bits for its file in the FUSE
// mount (fuse-uid=, fuse-gid=, fuse-mode=); unset: the mount's.
struct FileAttrs {
  std::optional<uid_t> uid;
  std::optional<gid_t> gid;
  std::optional<mode_t> mode;

  struct Resolved {
    uid_t uid = 0;
    gid_t gid = 0;
    mode_t mode = 0;  // permission bits only
  };
  // What the file shows: the mount's values where unset; a read-only
  // export's file loses its write (and execute) bits.
  [[nodiscard]] Resolved resolve(uid_t mount_uid, gid_t mount_gid, mode_t mount_mode, bool read_only) const {
    const mode_t m = mode.value_or(mount_mode);
    return {uid.value_or(mount_uid), gid.value_or(mount_gid), read_only ? (m & 0444) : m};
  }
  [[nodiscard]] bool operator==(const FileAttrs&) const = default;
};

}  // namespace blockway::core
