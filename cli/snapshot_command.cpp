// blockway snapshot create|list|delete CLONE [SNAPSHOT] and blockway revert
// CLONE SNAPSHOT: the snapshots of a clone's overlay.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/exit_codes.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

namespace blockway::cli {
namespace {

void print_list(const Json& r) {
  const auto& list = r.at("snapshots");
  if (r.contains("message")) fmt::print("{}\n", str(r, "message"));
  if (list.empty()) return (void)fmt::print("clone '{}' has no snapshots\n", str(r, "name"));
  fmt::print("snapshots of clone '{}', oldest first:\n", str(r, "name"));
  for (const auto& s : list)
    fmt::print("  {:<24} {} written before it, served read-only as export '{}'\n", str(s, "name"),
               bytes(u64(s, "allocated_bytes")), s.contains("export") ? str(s, "export") : "");
}

}  // namespace

int snapshot_command(const std::vector<std::string>& in) {
  static const std::string usage =
      "Usage: blockway snapshot create CLONE SNAPSHOT [--json] [--socket PATH]\n"
      "       blockway snapshot list CLONE [--json] [--socket PATH]\n"
      "       blockway snapshot delete CLONE SNAPSHOT [--force] [--json] [--socket PATH]\n\n"
      "create freezes the clone's current content as SNAPSHOT (letters, digits, '.',\n"
      "'_', '-'); its new writes go to a new overlay on top. Clients stay connected.\n"
      "Every snapshot is also served as the read-only export CLONE@SNAPSHOT.\n"
      "delete merges the snapshot's blocks into the level above it (the next\n"
      "snapshot, or the clone's current overlay) while clients go on, then forgets\n"
      "it; refused while NBD clients use CLONE@SNAPSHOT unless --force (their reads\n"
      "then fail). Snapshots are kept in the catalogue across restarts. blockway\n"
      "revert goes back to the newest snapshot.";
  OneRequest command{.usage = usage, .flags = {"--force"}, .positionals = 2, .optional_positionals = 1};
  command.request = [](const Args& a) {
    const std::string& verb = a.positional[0];
    const bool named = a.positional.size() == 3;
    if (verb == "delete" && named)
      return Request("snapshot-delete",
                     {{"name", a.positional[1]}, {"snapshot", a.positional[2]}, {"force", a.has("--force")}});
    if (verb == "create" && named && !a.has("--force"))
      return Request("snapshot-create", {{"name", a.positional[1]}, {"snapshot", a.positional[2]}});
    if (verb == "list" && !named) return Request("snapshot-list", {{"name", a.positional[1]}});
    throw CliError(kUsage, usage);
  };
  command.print = [](const Args&, const Json& r) { print_list(r); };
  return run_one_request(in, command);
}

int revert_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway revert CLONE SNAPSHOT [--force] [--json] [--socket PATH]\n\n"
               "Discards every write the clone took since SNAPSHOT, its newest snapshot\n"
               "(delete later snapshots first to go further back); the snapshot stays.\n"
               "Refused while NBD clients are connected, whose caches would keep the\n"
               "discarded data, unless --force.",
      .flags = {"--force"},
      .positionals = 2};
  command.request = [](const Args& a) {
    return Request("revert", {{"name", a.positional[0]}, {"snapshot", a.positional[1]}, {"force", a.has("--force")}});
  };
  command.print = [](const Args&, const Json& r) { fmt::print("{}\n", str(r, "message")); };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
