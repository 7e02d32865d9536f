// blockwayd's command line: one table of flags that both parses them and
// writes --help, how they combine with --config FILE, and the --help text,
// made from the tables that validate what it lists (the flags, the backends
// and their URI forms and options, the cache, export and FUSE options, the
// exit codes), so that it cannot drift from what the daemon accepts.
//
// Start-up only, main thread.
#pragma once

#include "core/listen_address.hpp"
#include "gateway/config.hpp"

#include <string>
#include <string_view>
#include <vector>

namespace blockway::gateway {

// blockwayd's exit codes.
enum DaemonExit : int {
  kExitStopped = 0,  // stopped after SIGTERM/SIGINT, or --stdio's client left
  kExitFatal = 1,    // an error while running
  kExitConfig = 2,   // a configuration mistake: a flag, the file, an export or an option
};

struct CommandLine {
  enum class Action { run, help, help_man, version };
  Action action = Action::run;
  std::string man_section;                 // --help-man
  DaemonConfig config;                     // what the flags set
  std::string config_file;                 // --config
  std::vector<core::ListenAddress> listen;  // --listen: replaces the file's
  bool metrics_set = false;                 // --metrics given: replaces [metrics] listen
  bool tls_mode_set = false;                // --tls given: replaces [tls] mode
};

// Parses blockwayd's arguments (without argv[0]). Throws core::ConfigError.
CommandLine parse_command_line(const std::vector<std::string>& args);

// The configuration to run: the file's, if --config named one, with the
// command line's values over it (exports from both places), then checked.
// Throws core::ConfigError.
DaemonConfig effective_config(CommandLine line);

// The text of blockwayd --help.
std::string usage();

// Every flag, with its value placeholder ("--listen", "ADDR"), for tests.
std::vector<std::pair<std::string_view, std::string_view>> flags();

// Every flag with its placeholder and help, and the exit codes with their
// meaning: what the man page is made from (gateway/man_page.hpp).
struct FlagHelp {
  std::string_view name, value, help;
};
std::vector<FlagHelp> flag_help();
std::vector<std::pair<int, std::string_view>> exit_codes();

}  // namespace blockway::gateway
