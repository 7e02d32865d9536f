// blockway cache drop NAME [--keep-profile]: empty an export's cache (every
// chunk fetched again when read), e.g. to measure or replay a cold start.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/exit_codes.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

namespace blockway::cli {

int cache_command(const std::vector<std::string>& in) {
  static const std::string usage =
      "Usage: blockway cache drop NAME [--keep-profile] [--json] [--socket PATH]\n\n"
      "Empties the export's cache while clients stay connected: every chunk is\n"
      "fetched from the remote again when read, and the cache file's space is\n"
      "freed. Refused while chunks are dirty (not on the remote yet: flush, or\n"
      "wait for the write-back, first), while the prefetch runs (pause it), and\n"
      "after detach (the cache file is then the image). --keep-profile keeps the\n"
      "access profile, so that prefetch hot-first fetches what was read before\n"
      "first; without it the profile is forgotten too. Reads after the drop\n"
      "start a new profile session.";
  OneRequest command{.usage = usage, .flags = {"--keep-profile"}, .positionals = 2};
  command.request = [](const Args& a) {
    if (a.positional[0] != "drop") throw CliError(kUsage, usage);
    return Request("cache-drop", {{"name", a.positional[1]}, {"keep_profile", a.has("--keep-profile")}});
  };
  command.print = [](const Args&, const Json& r) { fmt::print("{}\n", str(r, "message")); };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
