// The blockway command's subcommands: one function per subcommand, each
// returning the process exit code. Runs on the main thread only.
#pragma once

#include <string>
#include <vector>

namespace blockway::cli {

int info_command(const std::vector<std::string>& args);
// status, stats, export, prefetch, detach, mode, flush: talk to the running
// daemon's control socket. Returns -1 if `cmd` is none of these.
int control_command(const std::string& cmd, const std::vector<std::string>& args);

}  // namespace blockway::cli
