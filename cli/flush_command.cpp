// blockway flush NAME: make every acknowledged write durable.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <cstdio>

namespace blockway::cli {

int flush_command(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway flush NAME [--socket PATH]\n\n"
      "Flushes the export: every write acknowledged so far reaches stable storage\n"
      "(in write-back modes, the cache's stable storage).";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 1, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("flush", {{"name", a.positional[0]}});
  if (a.has("--json")) return print_json(r), kOk;
  std::puts(str(r, "message", "export '" + a.positional[0] + "' flushed").c_str());
  return kOk;
}

}  // namespace blockway::cli
