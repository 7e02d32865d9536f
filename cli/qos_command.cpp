// blockway qos NAME [--read-iops N] [--write-iops N] [--read-bps SIZE]
// [--write-bps SIZE] [--burst SECONDS] | --off: show or change an export's
// QoS limits at run time.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

namespace blockway::cli {

int qos_command(const std::vector<std::string>& in) {
  static constexpr std::pair<const char*, const char*> kLimits[] = {{"--read-iops", "read_iops"},
                                                                   {"--write-iops", "write_iops"},
                                                                   {"--read-bps", "read_bps"},
                                                                   {"--write-bps", "write_bps"},
                                                                   {"--burst", "burst"}};
  OneRequest command{
      .usage = "Usage: blockway qos NAME [--read-iops N] [--write-iops N] [--read-bps SIZE]\n"
               "                         [--write-bps SIZE] [--burst SECONDS] [--json] [--socket PATH]\n"
               "       blockway qos NAME --off\n\n"
               "Shows an export's QoS limits and the requests they delayed, or changes the\n"
               "limits given (the others stay; 0 lifts one). SIZE is bytes per second with a\n"
               "binary suffix (10M); --burst is how many seconds of each limit an idle export\n"
               "may use at once. --off lifts every limit. The change applies at once, to\n"
               "requests already waiting too, and is kept across restarts.",
      .flags = {"--off"},
      .positionals = 1};
  for (const auto& [flag, key] : kLimits) {
    command.options.insert(flag);
    command.argument_options.emplace_back(key, flag);
  }
  command.request = [](const Args& a) {
    Json req = {{"name", a.positional[0]}};
    for (const auto& [flag, key] : kLimits)
      if (a.options.contains(flag)) req[key] = a.option(flag);
    if (a.has("--off")) req["off"] = true;
    return Request("qos", req);
  };
  command.print = [](const Args&, const Json& r) {
    fmt::print("export '{}': {}, burst {} s\n{}", str(r, "name"),
               r.value("limited", false) ? "limited" : "no limits", dbl(r, "burst"), qos_summary(r, "  "));
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
