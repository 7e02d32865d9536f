// Snapshot commands of the control plane, for clones (exports with a
// SnapshotControl): snapshot-create, snapshot-list, snapshot-delete and
// revert. Revert is refused while NBD clients are connected (their caches
// would hold data the clone no longer has) unless forced.
//
// Thread model: handlers run on the control plane's event loop; the
// overlay synchronises its own chain changes.
#pragma once

#include "core/export.hpp"
#include "core/snapshot_control.hpp"
#include "gateway/control_protocol.hpp"

#include <functional>
#include <memory>

namespace blockway::gateway {

// The snapshots of an export if it is a clone, else null (StackBuilder::snapshots_of).
using SnapshotLookup = std::function<core::SnapshotControl*(const std::shared_ptr<core::Export>&)>;

void add_snapshot_commands(ControlDispatcher& dispatcher, core::ExportTable& exports, SnapshotLookup lookup);

}  // namespace blockway::gateway
