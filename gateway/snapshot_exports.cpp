#include "gateway/snapshot_exports.hpp"

#include "core/logging.hpp"

#include <stdexcept>

namespace blockway::gateway {

using core::Export;

void publish_snapshot(core::ExportTable& exports, const std::shared_ptr<Export>& clone,
                      core::SnapshotControl& snapshots, const std::string& snapshot) {
  const std::string name = snapshot_export_name(clone->name, snapshot);
  // The view keeps the clone's export (and so its overlay) alive while a
  // session still reads it after the clone left the table.
  auto view = snapshots.snapshot_view(snapshot, clone);
  if (!view) return;
  auto exp = std::make_shared<Export>();
  exp->name = name;
  exp->description = "snapshot '" + snapshot + "' of clone '" + clone->name + "'";
  exp->uri = "snapshot:" + name;
  exp->snapshot_of = clone->name;
  exp->device = std::make_shared<core::CheckedDevice>(std::move(view), true);
  exp->tls_required = clone->tls_required;
  exp->access.store(clone->access.load());  // both follow the clone's at run time (blockway access)
  exp->file_attrs.store(clone->file_attrs.load());
  try {
    exports.add(std::move(exp));
  } catch (const std::invalid_argument& e) {
    core::logger("control")->warn("snapshot '{}' of clone '{}' is not served as an export: {}", snapshot,
                                  clone->name, e.what());
  }
}

void publish_snapshots(core::ExportTable& exports, const std::shared_ptr<Export>& clone,
                       core::SnapshotControl* snapshots) {
  if (!snapshots) return;
  for (const auto& s : snapshots->snapshots()) publish_snapshot(exports, clone, *snapshots, s.name);
}

void unpublish_snapshots(core::ExportTable& exports, const std::string& clone, const std::string& snapshot) {
  for (const auto& exp : exports.list())
    if (exp->snapshot_of == clone && (snapshot.empty() || exp->name == snapshot_export_name(clone, snapshot)))
      exports.remove(exp->name);
}

long snapshot_clients(const core::ExportTable& exports, const std::string& clone, const std::string& snapshot) {
  long n = 0;
  for (const auto& exp : exports.list())
    if (exp->snapshot_of == clone && (snapshot.empty() || exp->name == snapshot_export_name(clone, snapshot)))
      n += exp->clients.load(std::memory_order_relaxed);
  return n;
}

}  // namespace blockway::gateway
