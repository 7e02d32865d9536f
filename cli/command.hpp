// The blockway command's subcommands: one function per subcommand (one file
// each, cli/NAME_command.cpp), each returning the process exit code, and the
// table that dispatches to them and writes `blockway --help`.
//
// Main thread only.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace blockway::cli {

int info_command(const std::vector<std::string>& args);
int status_command(const std::vector<std::string>& args);
int stats_command(const std::vector<std::string>& args);
int export_command(const std::vector<std::string>& args);
int clone_command(const std::vector<std::string>& args);
int snapshot_command(const std::vector<std::string>& args);
int revert_command(const std::vector<std::string>& args);
int flatten_command(const std::vector<std::string>& args);
int export_image_command(const std::vector<std::string>& args);
int profile_command(const std::vector<std::string>& args);
int cache_command(const std::vector<std::string>& args);
int prefetch_command(const std::vector<std::string>& args);
int detach_command(const std::vector<std::string>& args);
int mode_command(const std::vector<std::string>& args);
int qos_command(const std::vector<std::string>& args);
int remote_bandwidth_command(const std::vector<std::string>& args);
int access_command(const std::vector<std::string>& args);
int flush_command(const std::vector<std::string>& args);
int mount_command(const std::vector<std::string>& args);
int unmount_command(const std::vector<std::string>& args);
int trace_command(const std::vector<std::string>& args);
int connect_command(const std::vector<std::string>& args);
int disconnect_command(const std::vector<std::string>& args);
int devices_command(const std::vector<std::string>& args);

struct Command {
  std::string_view name;
  // Its entry in `blockway --help`: the synopsis, the description from
  // column 23, continuation lines indented to it.
  std::string_view help;
  int (*run)(const std::vector<std::string>& args);
  bool daemon = true;  // talks to the running daemon's control socket
};

// Every subcommand, in --help order.
std::span<const Command> commands();
// The text of `blockway --help`, from commands() and kExitCodes.
std::string usage();
// Runs subcommand `name` (its errors printed as "blockway NAME: ..."), or
// returns -1 if there is none.
int run_command(const std::string& name, const std::vector<std::string>& args);

}  // namespace blockway::cli
