// blockway detach NAME: run an export from its cache alone.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <cstdio>

namespace blockway::cli {

int detach_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway detach NAME [--force] [--socket PATH]\n\n"
               "Switches the export to local-only operation once every chunk is in its cache:\n"
               "the remote is closed and never contacted again, clients stay connected, and\n"
               "the cache file is the image. Refused while chunks are missing (run prefetch\n"
               "first) or dirty; --force waits for dirty chunks to be written back first.",
      .flags = {"--force"},
      .positionals = 1};
  command.request = [](const Args& a) {
    return Request("detach", {{"name", a.positional[0]}, {"force", a.has("--force")}});
  };
  command.print = [](const Args& a, const Json& r) {
    std::puts(str(r, "message", "export '" + a.positional[0] + "' detached: it now runs without its remote").c_str());
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
