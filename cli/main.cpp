// blockway: the command line of the blockway gateway.
#include "cli/command.hpp"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr const char* kUsage = R"(Usage: blockway COMMAND [ARGS]

Commands:
  info [--json] URI   size, flags and block sizes of an NBD export, e.g.
                      blockway info nbd://localhost/demo
                      blockway info 'nbd+unix:///demo?socket=/run/blockway.sock'
  --version           print the version
  --help              this text
)";

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") {
    std::printf("blockway %s\n", BLOCKWAY_VERSION);
    return 0;
  }
  const std::string cmd = args[0];
  args.erase(args.begin());
  if (cmd == "info") return blockway::cli::info_command(args);
  std::fprintf(stderr, "blockway: unknown command '%s' (see blockway --help)\n", cmd.c_str());
  return 2;
}
