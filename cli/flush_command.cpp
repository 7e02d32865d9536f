// blockway flush NAME: make every acknowledged write durable.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <cstdio>

namespace blockway::cli {

int flush_command(const std::vector<std::string>& in) {
  OneRequest command{.usage = "Usage: blockway flush NAME [--socket PATH]\n\n"
                              "Flushes the export: every write acknowledged so far reaches stable storage\n"
                              "(in write-back modes, the cache's stable storage).",
                     .positionals = 1};
  command.request = [](const Args& a) { return Request("flush", {{"name", a.positional[0]}}); };
  command.print = [](const Args& a, const Json& r) {
    std::puts(str(r, "message", "export '" + a.positional[0] + "' flushed").c_str());
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
