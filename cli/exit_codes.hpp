// The exit codes of the blockway command, one per kind of failure, so that
// scripts can tell them apart; kExitCodes says what each means, for --help.
#pragma once

#include <string_view>

namespace blockway::cli {

enum Exit : int {
  kOk = 0,
  kFailed = 1,          // the daemon tried the action and it failed
  kUsage = 2,           // wrong command line (or a request the daemon calls malformed)
  kNoDaemon = 3,        // no daemon answers on the control socket
  kUnknownExport = 4,   // no export by that name
  kRefused = 5,         // the daemon refused: busy, not possible now, export without a cache
  kProtocol = 6,        // the daemon's answer made no sense (or it lacks the command)
  kTimedOut = 7,        // --timeout ran out before the awaited state (the action goes on)
};

struct ExitCode {
  Exit code;
  std::string_view meaning;
};

inline constexpr ExitCode kExitCodes[] = {
    {kOk, "success"},
    {kFailed, "the action failed"},
    {kUsage, "wrong usage"},
    {kNoDaemon, "no daemon answers"},
    {kUnknownExport, "unknown export"},
    {kRefused, "refused (busy, not possible now, no cache)"},
    {kProtocol, "unexpected answer from the daemon"},
    {kTimedOut, "--timeout ran out before the awaited state (the action goes on)"},
};

}  // namespace blockway::cli
