// The blockway command's subcommands: one function per subcommand, each
// returning the process exit code. Runs on the main thread only.
#pragma once

#include <string>
#include <vector>

namespace blockway::cli {

int info_command(const std::vector<std::string>& args);

}  // namespace blockway::cli
