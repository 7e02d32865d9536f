#include "gateway/snapshot_commands.hpp"

#include "core/logging.hpp"
#include "gateway/snapshot_exports.hpp"

#include <cerrno>

namespace blockway::gateway {
namespace {

using core::Export;
using core::Task;

struct Target {
  std::shared_ptr<Export> exp;  // keeps the chain (and its SnapshotControl) alive
  core::SnapshotControl* snapshots = nullptr;
};

struct Context {
  core::ExportTable& exports;
  SnapshotLookup lookup;
};

Target find_clone(const Context& ctx, const Json& req) {
  const auto name = arg_string(req, "name");
  auto exp = name.empty() ? nullptr : ctx.exports.find(name);
  if (!exp || exp->name != name) throw ControlError("unknown-export", ENOENT, "no export named '" + name + "'");
  auto* snapshots = ctx.lookup(exp);
  if (!snapshots)
    throw ControlError("refused", EINVAL,
                       "export '" + name + "' is not a clone; snapshots are of clones (blockway clone BASE NAME)");
  return {exp, snapshots};
}

Json list_json(const Target& t) {
  Json list = Json::array();
  for (const auto& s : t.snapshots->snapshots())
    list.push_back({{"name", s.name},
                    {"allocated_bytes", s.allocated_bytes},
                    {"export", snapshot_export_name(t.exp->name, s.name)}});
  return {{"name", t.exp->name}, {"snapshots", std::move(list)}};
}

// A SnapshotControl result as the reply, or the error it names.
Json answer(const Target& t, const core::ControlResult& r) {
  if (!r.ok()) {
    const int e = r.ec.value();
    throw ControlError(e == EINVAL ? "bad-request" : (e == EIO ? "failed" : "refused"), e, r.message);
  }
  Json out = list_json(t);
  out["message"] = r.message;
  core::logger("control")->info("{}", r.message);
  return out;
}

Task<Json> snapshot_list(std::shared_ptr<const Context> ctx, Json req) { co_return list_json(find_clone(*ctx, req)); }

Task<Json> snapshot_create(std::shared_ptr<const Context> ctx, Json req) {
  const auto t = find_clone(*ctx, req);
  const auto snap = arg_string(req, "snapshot");
  const auto r = co_await t.snapshots->snapshot(snap);
  if (r.ok()) publish_snapshot(ctx->exports, t.exp, *t.snapshots, snap);
  co_return answer(t, r);
}

// Refused while NBD clients read the snapshot's export, unless forced: the
// merge removes the level the view reads (forced, their reads fail with EIO).
Task<Json> snapshot_delete(std::shared_ptr<const Context> ctx, Json req) {
  const auto t = find_clone(*ctx, req);
  const auto snap = arg_string(req, "snapshot");
  const long clients = snapshot_clients(ctx->exports, t.exp->name, snap);
  if (clients > 0 && !arg_bool(req, "force", false))
    throw ControlError("refused", EBUSY,
                       "snapshot export '" + snapshot_export_name(t.exp->name, snap) + "' has " +
                           std::to_string(clients) + " client connection(s); disconnect them first, or force "
                           "(their reads then fail)");
  const auto r = co_await t.snapshots->delete_snapshot(snap);
  if (r.ok()) unpublish_snapshots(ctx->exports, t.exp->name, snap);
  co_return answer(t, r);
}

Task<Json> revert(std::shared_ptr<const Context> ctx, Json req) {
  const auto t = find_clone(*ctx, req);
  const auto snap = arg_string(req, "snapshot");
  const long clients = export_clients(t.exp);
  if (clients > 0 && !arg_bool(req, "force", false))
    throw ControlError("refused", EBUSY,
                       "clone '" + t.exp->name + "' has " + std::to_string(clients) +
                           " client connection(s), whose caches would keep data the revert discards; "
                           "disconnect them first, or force");
  co_return answer(t, co_await t.snapshots->revert(snap));
}

Json flatten_json(const Target& t) {
  const auto p = t.snapshots->flatten_progress();
  Json j{{"name", t.exp->name},
         {"base", t.exp->clone_of},
         {"state", core::flatten_state_name(p.state)},
         {"done_bytes", p.done_bytes},
         {"total_bytes", p.total_bytes},
         {"rate", p.rate},
         {"copied_bytes", p.copied_bytes},
         {"percent", p.total_bytes ? 100.0 * static_cast<double>(p.done_bytes) / static_cast<double>(p.total_bytes)
                                   : 100.0}};
  if (!p.error.empty()) j["error"] = p.error;
  return j;
}

Task<Json> flatten_status(std::shared_ptr<const Context> ctx, Json req) { co_return flatten_json(find_clone(*ctx, req)); }

// Starts (or re-paces) a clone's flatten, or cancels it; answers at once
// with its progress (the CLI's --wait polls flatten-status).
Task<Json> flatten(std::shared_ptr<const Context> ctx, Json req) {
  const auto t = find_clone(*ctx, req);
  const bool cancel = arg_bool(req, "cancel", false);
  const bool paced = req.contains("rate");
  const uint64_t rate = paced ? arg_size(req, "rate") : 0;
  core::ControlResult r;
  if (cancel) {
    r = co_await t.snapshots->cancel_flatten();
  } else if (!paced && t.snapshots->flatten_progress().state == core::FlattenState::running) {
    // No rate given: a running flatten keeps its pace (the CLI then follows it).
    r.message = "flatten of clone '" + t.exp->name + "' is running";
  } else {
    r = co_await t.snapshots->flatten(rate);
  }
  if (!r.ok()) {
    const int e = r.ec.value();
    throw ControlError(e == EIO ? "failed" : "refused", e, r.message);
  }
  core::logger("control")->info("{}", r.message);
  Json out = flatten_json(t);
  out["message"] = r.message;
  co_return out;
}

}  // namespace

void add_snapshot_commands(ControlDispatcher& d, core::ExportTable& exports, SnapshotLookup lookup) {
  auto ctx = std::make_shared<const Context>(Context{exports, std::move(lookup)});
  d.add("snapshot-list", "a clone's snapshots, oldest first {name}",
        [ctx](const Json& req) { return snapshot_list(ctx, req); });
  d.add("snapshot-create", "freeze a clone's content as a snapshot {name, snapshot}",
        [ctx](const Json& req) { return snapshot_create(ctx, req); });
  d.add("snapshot-delete", "delete a snapshot, merging it into the level above (online) {name, snapshot, force?}",
        [ctx](const Json& req) { return snapshot_delete(ctx, req); });
  d.add("flatten", "copy every block a clone reads from its base into its overlay, in the background, "
                   "or stop that {name, rate? (bytes/s, 0 = unlimited; absent: unlimited, or unchanged if it "
                   "runs), cancel?}",
        [ctx](const Json& req) { return flatten(ctx, req); });
  d.add("flatten-status", "a clone's flatten progress {name}",
        [ctx](const Json& req) { return flatten_status(ctx, req); });
  d.add("revert", "discard a clone's writes since its newest snapshot {name, snapshot, force?}",
        [ctx](const Json& req) { return revert(ctx, req); });
}

}  // namespace blockway::gateway
