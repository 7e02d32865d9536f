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

Commands that talk to the running daemon (its control socket: --socket PATH,
or $BLOCKWAY_SOCKET, default /run/blockway/control.sock for root):
  status              every export: mode, size, cached/dirty bytes, prefetch,
                      remote health, clients
  stats NAME          one export's state and counters
  export list         exports (--names: names only)
  export add NAME URI [OPTIONS]
                      add an export (OPTIONS as on blockwayd --export), saved
                      so that the daemon opens it again at start
  export remove NAME [--force]
  prefetch start|pause|resume|status NAME
  prefetch NAME [--wait]
                      start (or resume) copying the image into the cache;
                      --wait follows it with a progress bar
  prefetch rate NAME RATE
                      limit the prefetch (50M = 50 MiB/s, 0 = unlimited)
  detach NAME [--force]
                      run the export from its cache alone, without the remote
  mode NAME MODE      writethrough, writeback or writeback-local
  flush NAME          flush the export
  mount DIR           mount the FUSE front end at DIR: every export as a file
  unmount             unmount it
Every command takes --help; read commands take --json.

Exit codes: 0 success, 1 the action failed, 2 wrong usage, 3 no daemon answers,
4 unknown export, 5 refused (busy, not possible now, no cache), 6 unexpected
answer from the daemon.

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
  if (cmd == "info") return blockway::cli::info_command(args);
  if (const int rc = blockway::cli::control_command(cmd, args); rc >= 0) return rc;
  std::fprintf(stderr, "blockway: unknown command '%s' (see blockway --help)\n", cmd.c_str());
  return 2;
}
