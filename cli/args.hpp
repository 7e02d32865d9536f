// The command line of one blockway subcommand: positionals, flags and
// options with a value, and the checks every subcommand shares.
//
// Main thread only.
#pragma once

#include "cli/control_client.hpp"

#include <cstddef>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace blockway::cli {

struct Args {
  std::vector<std::string> positional;
  std::set<std::string> flags;
  std::map<std::string, std::string> options;
  bool help = false;

  [[nodiscard]] bool has(const std::string& f) const { return flags.contains(f); }
  [[nodiscard]] std::string option(const std::string& o) const {
    auto it = options.find(o);
    return it == options.end() ? std::string() : it->second;
  }
};

// Parses a subcommand's arguments. Every subcommand accepts --json, --socket
// PATH and --help besides its own `flags` and `options` (which take a value).
// Throws CliError(kUsage) with `usage` for anything else.
Args parse_args(const std::vector<std::string>& in, const std::string& usage, std::set<std::string> flags,
                std::set<std::string> options);

// Exactly n positionals, else CliError(kUsage) with `usage`.
void need_positionals(const Args& a, size_t n, const std::string& usage);

// A control command and its arguments: {"flush", {{"name", "vm1"}}}.
using Request = std::pair<std::string, Json>;

// The shape of most subcommands: parse the arguments, answer --help, send
// one request to the daemon, print the answer (as JSON with --json).
struct OneRequest {
  std::string usage;
  std::set<std::string> flags = {};  // besides --json, --socket and --help
  size_t positionals = 0;
  size_t optional_positionals = 0;  // that may follow them
  std::set<std::string> options = {};  // that take a value, besides --socket
  // The control command and its arguments, from the parsed command line.
  std::function<Request(const Args&)> request;
  // Prints the answer for people.
  std::function<void(const Args&, const Json&)> print;
  // Control argument -> the option that sets it ({"read_iops", "--read-iops"}):
  // the daemon's errors then name what the user typed.
  std::vector<std::pair<std::string, std::string>> argument_options = {};
};
int run_one_request(const std::vector<std::string>& in, const OneRequest& command);

}  // namespace blockway::cli
