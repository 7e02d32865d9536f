// blockway: the command line of the blockway gateway.
#include "cli/command.hpp"

#include <cstdio>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  namespace cli = blockway::cli;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(cli::usage().c_str(), args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") {
    std::printf("blockway %s\n", BLOCKWAY_VERSION);
    return 0;
  }
  // "blockway --socket PATH COMMAND ..." = "blockway COMMAND ... --socket PATH".
  if (args.size() >= 2 && args[0] == "--socket") {
    std::vector<std::string> global(args.begin(), args.begin() + 2);
    args.erase(args.begin(), args.begin() + 2);
    if (args.empty()) {
      std::fputs("blockway: --socket PATH needs a command after it\n", stderr);
      return 2;
    }
    args.insert(args.end(), global.begin(), global.end());
  }
  const std::string cmd = args[0];
  args.erase(args.begin());
  if (const int rc = cli::run_command(cmd, args); rc >= 0) return rc;
  std::fprintf(stderr, "blockway: unknown command '%s' (see blockway --help)\n", cmd.c_str());
  return 2;
}
