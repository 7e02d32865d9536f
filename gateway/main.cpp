// blockwayd: the blockway daemon's command line (see command_line.hpp).
#include "core/logging.hpp"
#include "core/options.hpp"
#include "gateway/command_line.hpp"
#include "gateway/daemon.hpp"
#include "gateway/man_page.hpp"

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  namespace gateway = blockway::gateway;
  try {
    auto line = gateway::parse_command_line(std::vector<std::string>(argv + 1, argv + argc));
    if (line.action == gateway::CommandLine::Action::help) {
      std::cout << gateway::usage();
      return gateway::kExitStopped;
    }
    if (line.action == gateway::CommandLine::Action::help_man) {
      std::cout << gateway::man_section(line.man_section);
      return gateway::kExitStopped;
    }
    if (line.action == gateway::CommandLine::Action::version) {
      std::cout << "blockwayd " << BLOCKWAY_VERSION << "\n";
      return gateway::kExitStopped;
    }
    auto config = gateway::effective_config(std::move(line));
    blockway::core::init_logging(config.log_level, config.log_format, blockway::core::stderr_is_journal());
    return gateway::run_daemon(std::move(config));
  } catch (const blockway::core::ConfigError& e) {
    // "<3>": an error, for the journal (see core/logging.hpp).
    std::fprintf(stderr, "%sblockwayd: %s\n", blockway::core::stderr_is_journal() ? "<3>" : "", e.what());
    return gateway::kExitConfig;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%sblockwayd: fatal: %s\n", blockway::core::stderr_is_journal() ? "<2>" : "", e.what());
    return gateway::kExitFatal;
  }
}
