// blockway clone BASE NAME: a new export NAME that is a copy-on-write clone
// of the export BASE (export-add of clone:BASE), saved like export add.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <cstdio>

namespace blockway::cli {

int clone_command(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway clone BASE NAME [--overlay DIR] [--granularity SIZE] [--ro] [--socket PATH]\n\n"
      "Adds the export NAME, a clone of the export BASE: NAME reads what it never\n"
      "wrote through BASE (its cache, prefetch and remote, shared by every clone)\n"
      "and keeps its own writes in a local overlay file, DIR/NAME.img (default\n"
      "DATA-DIR/overlays), in blocks of SIZE (4k to 64k, default 64k). BASE is\n"
      "read-only while it has clones. The clone is saved in the catalogue and\n"
      "opened again at every start, as with `blockway export add NAME clone:BASE`.";
  auto a = parse_args(in, usage, {"--ro"}, {"--overlay", "--granularity"});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 2, usage);
  std::string options;
  auto add = [&options](const std::string& item) { options += (options.empty() ? "" : ",") + item; };
  if (a.has("--ro")) add("ro");
  if (const auto dir = a.option("--overlay"); !dir.empty()) add("overlay=" + dir);
  if (const auto g = a.option("--granularity"); !g.empty()) add("granularity=" + g);
  ControlClient c(control_socket_path(a.option("--socket")));
  Json req{{"name", a.positional[1]}, {"uri", "clone:" + a.positional[0]}};
  if (!options.empty()) req["options"] = options;
  const Json r = c.call("export-add", req);
  if (a.has("--json")) return print_json(r), kOk;
  const Json& o = r.contains("clone") ? r.at("clone") : Json::object();
  fmt::print("export '{}' added: a clone of '{}' ({}), overlay {}\n", a.positional[1], a.positional[0],
             bytes(u64(r, "size")), o.value("path", std::string("?")));
  return kOk;
}

}  // namespace blockway::cli
