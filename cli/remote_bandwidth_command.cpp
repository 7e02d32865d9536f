// blockway remote-bandwidth [RATE]: show the daemon-wide remote bandwidth
// cap and what it delayed, or change it until the next start.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

namespace blockway::cli {

int remote_bandwidth_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway remote-bandwidth [RATE] [--json] [--socket PATH]\n\n"
               "Shows the daemon-wide cap on bytes per second to and from network remotes\n"
               "and, for client work and the prefetch, the bytes charged, the requests\n"
               "delayed and those waiting now; with RATE (bytes per second with a binary\n"
               "suffix: 100M; 0 lifts the cap) changes it at once, for requests already\n"
               "waiting too, until the daemon restarts (the configuration's value then\n"
               "applies again). The cap must have been set at start (--remote-bandwidth).",
      .optional_positionals = 1};
  command.request = [](const Args& a) {
    Json req = Json::object();
    if (!a.positional.empty()) req["rate"] = a.positional[0];
    return Request("remote-bandwidth", req);
  };
  command.argument_options.emplace_back("rate", "RATE");
  command.print = [](const Args&, const Json& r) {
    fmt::print("remote bandwidth cap: {}\n", u64(r, "rate") ? bytes(u64(r, "rate")) + "/s" : std::string("none"));
    for (const char* c : {"client", "prefetch"})
      fmt::print("  {:<9} {} charged, {} delayed ({:.2f} s in all), {} waiting\n", c, bytes(u64(r[c], "bytes")),
                 u64(r[c], "delayed"), dbl(r[c], "delay_seconds"), u64(r[c], "queued"));
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
