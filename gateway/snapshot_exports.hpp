// Snapshot exports: every snapshot of a clone is served as a read-only export
// of its own, CLONE@SNAPSHOT (over NBD, and as a file in the FUSE mount,
// which follows the export table). Published when the clone is opened (start,
// export-add) and when a snapshot is taken; withdrawn when the snapshot is
// deleted or the clone removed. The view takes the clone's access rules, TLS
// requirement and FUSE owner and mode.
//
// Thread model: called on the control plane's loop (snapshot commands,
// export-add/remove) or at start-up before serving; the table locks itself.
#pragma once

#include "core/export.hpp"
#include "core/snapshot_control.hpp"

#include <memory>
#include <string>

namespace blockway::gateway {

[[nodiscard]] inline std::string snapshot_export_name(const std::string& clone, const std::string& snapshot) {
  return clone + "@" + snapshot;
}

// Adds CLONE@SNAPSHOT for one snapshot (nothing if the snapshot does not
// exist; a warning if another export has the name).
void publish_snapshot(core::ExportTable& exports, const std::shared_ptr<core::Export>& clone,
                      core::SnapshotControl& snapshots, const std::string& snapshot);
// The same for every snapshot of `clone`; nothing if `snapshots` is null.
void publish_snapshots(core::ExportTable& exports, const std::shared_ptr<core::Export>& clone,
                       core::SnapshotControl* snapshots);
// Removes the snapshot exports of clone `clone` (all of them, or the one of
// `snapshot`); sessions holding one keep it until they disconnect.
void unpublish_snapshots(core::ExportTable& exports, const std::string& clone, const std::string& snapshot = {});
// NBD clients of the snapshot exports of `clone` (all, or the one of `snapshot`).
[[nodiscard]] long snapshot_clients(const core::ExportTable& exports, const std::string& clone,
                                    const std::string& snapshot = {});

}  // namespace blockway::gateway
