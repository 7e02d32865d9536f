// blockway export list | add | remove: the run-time export table.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <cstdio>

namespace blockway::cli {

int export_command(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway export list [--json] [--names]\n"
      "       blockway export add NAME URI [OPTIONS]    (or NAME=URI[,OPTIONS] as on --export)\n"
      "       blockway export remove NAME [--force]\n"
      "  (each also takes --socket PATH)\n\n"
      "add opens the export at once and saves it in the daemon's catalogue, so it is\n"
      "opened again at every start; OPTIONS is the option list of blockwayd --export,\n"
      "e.g. ro,cache=/var/cache/blockway,mode=writeback.\n"
      "remove refuses while clients are connected; with --force the export takes no\n"
      "new clients at once and is closed when the connected ones leave. A saved export\n"
      "that failed to open at start (list shows \"failed: REASON\") is simply forgotten.";
  auto a = parse_args(in, usage, {"--force", "--names"}, {});
  if (a.positional.empty()) {
    if (a.help) return std::puts(usage.c_str()), kOk;
    throw CliError(kUsage, "missing subcommand (list, add or remove)\n" + usage);
  }
  if (a.help) return std::puts(usage.c_str()), kOk;
  const std::string sub = a.positional[0];
  a.positional.erase(a.positional.begin());
  if (sub == "list") {
    need_positionals(a, 0, usage);
    ControlClient c(control_socket_path(a.option("--socket")));
    const Json r = c.call("list");
    if (a.has("--json")) return print_json(r), kOk;
    if (a.has("--names")) {
      for (const auto& e : r.at("exports")) std::puts(str(e, "name").c_str());
      return kOk;
    }
    fmt::print("{:<16} {:<15} {:>10} {:>7}  {}\n", "NAME", "MODE", "SIZE", "CLIENTS", "URI");
    for (const auto& e : r.at("exports")) {
      if (failed_export(e)) {
        fmt::print("{:<16} {:<15} {:>10} {:>7}  {}  ({})\n", str(e, "name"), "failed", "-", "-", str(e, "uri"),
                   str(e, "state"));
        continue;
      }
      fmt::print("{:<16} {:<15} {:>10} {:>7}  {}\n", str(e, "name"),
                 str(e, "mode") + (e.value("read_only", false) ? ",ro" : ""), bytes(u64(e, "size")),
                 u64(e, "clients"), str(e, "uri"));
    }
    return kOk;
  }
  if (sub == "add") {
    std::string name, uri, options;
    if (a.positional.size() == 1 && a.positional[0].find('=') != std::string::npos) {
      const auto& spec = a.positional[0];
      const auto eq = spec.find('=');
      name = spec.substr(0, eq);
      const auto rest = spec.substr(eq + 1);
      const auto comma = rest.find(',');
      uri = rest.substr(0, comma);
      if (comma != std::string::npos) options = rest.substr(comma + 1);
    } else {
      if (a.positional.size() < 2 || a.positional.size() > 3)
        throw CliError(kUsage, "export add needs NAME URI [OPTIONS]\n" + usage);
      name = a.positional[0];
      uri = a.positional[1];
      if (a.positional.size() == 3) options = a.positional[2];
    }
    ControlClient c(control_socket_path(a.option("--socket")));
    Json req{{"name", name}, {"uri", uri}};
    if (!options.empty()) req["options"] = options;
    const Json r = c.call("export-add", req);
    if (a.has("--json")) return print_json(r), kOk;
    fmt::print("export '{}' added: {} ({}, {})\n", name, str(r, "backend"), bytes(u64(r, "size")), str(r, "mode"));
    return kOk;
  }
  if (sub == "remove") {
    need_positionals(a, 1, usage);
    ControlClient c(control_socket_path(a.option("--socket")));
    const Json r = c.call("export-remove", {{"name", a.positional[0]}, {"force", a.has("--force")}});
    if (a.has("--json")) return print_json(r), kOk;
    std::puts(str(r, "message", "removed").c_str());
    return kOk;
  }
  throw CliError(kUsage, "unknown export subcommand '" + sub + "'\n" + usage);
}

}  // namespace blockway::cli
