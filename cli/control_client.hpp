// ControlClient: one connection to blockwayd's control socket, one JSON
// request and one response line at a time (see gateway/control_protocol.hpp).
//
// Thread model: used by the blockway command on its main thread only.
#pragma once

#include <nlohmann/json.hpp>

#include <stdexcept>
#include <string>

namespace blockway::cli {

using Json = nlohmann::json;

// Exit codes of the blockway command, one per kind of failure, so scripts
// can tell them apart.
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

// Thrown with the exit code and the message for the operator.
struct CliError : std::runtime_error {
  CliError(int code_, const std::string& message) : std::runtime_error(message), code(code_) {}
  int code;
};

// The socket the command talks to: --socket, else $BLOCKWAY_SOCKET, else the
// daemon's default (core::default_control_socket()).
std::string control_socket_path(const std::string& from_option);

class ControlClient {
 public:
  // Connects; throws CliError(kNoDaemon) with a message that says why.
  explicit ControlClient(const std::string& path);
  ~ControlClient();
  ControlClient(const ControlClient&) = delete;
  ControlClient& operator=(const ControlClient&) = delete;

  // Sends {"cmd": cmd, ...args} and returns "result". An error response
  // becomes a CliError with the exit code for its error code.
  Json call(const std::string& cmd, Json args = Json::object());
  // Bounds every later send and receive to `seconds`; one that takes longer
  // is a CliError(kTimedOut).
  void set_timeout(double seconds);

 private:
  int fd_ = -1;
  std::string path_;
  std::string buffer_;
};

}  // namespace blockway::cli
