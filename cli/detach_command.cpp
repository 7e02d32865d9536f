// blockway detach NAME: run an export from its cache alone.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <cstdio>

namespace blockway::cli {

int detach_command(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway detach NAME [--force] [--socket PATH]\n\n"
      "Switches the export to local-only operation once every chunk is in its cache:\n"
      "the remote is closed and never contacted again, clients stay connected, and\n"
      "the cache file is the image. Refused while chunks are missing (run prefetch\n"
      "first) or dirty; --force waits for dirty chunks to be written back first.";
  auto a = parse_args(in, usage, {"--force"}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 1, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("detach", {{"name", a.positional[0]}, {"force", a.has("--force")}});
  if (a.has("--json")) return print_json(r), kOk;
  std::puts(str(r, "message", "export '" + a.positional[0] + "' detached: it now runs without its remote").c_str());
  return kOk;
}

}  // namespace blockway::cli
