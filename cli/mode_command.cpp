// blockway mode NAME MODE: change an export's write mode at run time.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <cstdio>

namespace blockway::cli {

int mode_command(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway mode NAME writethrough|writeback|writeback-local [--socket PATH]\n\n"
      "Changes the write mode of the export's cache at run time; leaving a write-back\n"
      "mode writes dirty data back first where the new mode needs it.";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 2, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("mode", {{"name", a.positional[0]}, {"mode", a.positional[1]}});
  if (a.has("--json")) return print_json(r), kOk;
  std::puts(str(r, "message", "export '" + a.positional[0] + "' now in mode " + a.positional[1]).c_str());
  return kOk;
}

}  // namespace blockway::cli
