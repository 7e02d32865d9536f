// blockway mode NAME MODE: change an export's write mode at run time.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <cstdio>

namespace blockway::cli {

int mode_command(const std::vector<std::string>& in) {
  OneRequest command{.usage = "Usage: blockway mode NAME writethrough|writeback|writeback-local [--socket PATH]\n\n"
                              "Changes the write mode of the export's cache at run time; leaving a write-back\n"
                              "mode writes dirty data back first where the new mode needs it.",
                     .positionals = 2};
  command.request = [](const Args& a) {
    return Request("mode", {{"name", a.positional[0]}, {"mode", a.positional[1]}});
  };
  command.print = [](const Args& a, const Json& r) {
    std::puts(str(r, "message", "export '" + a.positional[0] + "' now in mode " + a.positional[1]).c_str());
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
