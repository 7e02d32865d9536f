// SnapshotControl: the snapshots of a clone's overlay, as the control plane
// asks for them (`blockway snapshot`, `blockway revert`). Implemented by
// cache::OverlayLayer; the interface lives in core/ so that the control plane
// does not depend on the overlay's internals.
//
// Thread model: every method may be called from any event-loop thread; the
// implementation serialises chain changes itself.
#pragma once

#include "core/block_device.hpp"
#include "core/export_control.hpp"
#include "core/task.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace blockway::core {

struct SnapshotInfo {
  std::string name;
  uint64_t allocated_bytes = 0;  // blocks written between the previous snapshot and this one
};

// A clone's flatten (`blockway flatten`): the copy of every block it still
// reads from its base into its own overlay, after which it needs no base.
enum class FlattenState : uint8_t { none, running, done, cancelled, failed };
[[nodiscard]] constexpr const char* flatten_state_name(FlattenState s) noexcept {
  switch (s) {
    case FlattenState::running: return "running";
    case FlattenState::done: return "done";
    case FlattenState::cancelled: return "cancelled";
    case FlattenState::failed: return "failed";
    case FlattenState::none: break;
  }
  return "none";
}
struct FlattenProgress {
  FlattenState state = FlattenState::none;
  uint64_t done_bytes = 0;   // bytes the clone's levels hold (the base is needed for the rest)
  uint64_t total_bytes = 0;  // the image's size
  uint64_t rate = 0;         // bytes per second the flatten is paced at; 0: unlimited
  uint64_t copied_bytes = 0; // bytes copied from the base by this daemon's run of it
  std::string error;         // why it failed (state failed)
};

class SnapshotControl {
 public:
  virtual ~SnapshotControl() = default;
  // Oldest first.
  [[nodiscard]] virtual std::vector<SnapshotInfo> snapshots() const = 0;
  // Freezes the current content as snapshot `name`; new writes go on top.
  virtual Task<ControlResult> snapshot(std::string name) = 0;
  // Discards every write since the newest snapshot, which must be `name`.
  virtual Task<ControlResult> revert(std::string name) = 0;
  // Merges the snapshot into the level above it and forgets it; online.
  virtual Task<ControlResult> delete_snapshot(std::string name) = 0;
  // A read-only device showing snapshot `name` as it was frozen, or null if
  // there is no such snapshot. It keeps `keep` (what owns this control)
  // alive; once the snapshot is deleted its reads fail with EIO.
  [[nodiscard]] virtual std::unique_ptr<BlockDevice> snapshot_view(const std::string& name,
                                                                   std::shared_ptr<const void> keep) = 0;
  // Starts (or re-paces, if running) the flatten in the background, at
  // `rate` bytes per second (0: unlimited). Refused while the clone has
  // snapshots.
  virtual Task<ControlResult> flatten(uint64_t rate) = 0;
  // Stops a running flatten; what it copied stays in the overlay.
  virtual Task<ControlResult> cancel_flatten() = 0;
  [[nodiscard]] virtual FlattenProgress flatten_progress() const = 0;
};

}  // namespace blockway::core
