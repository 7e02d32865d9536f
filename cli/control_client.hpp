// ControlClient: one connection to blockwayd's control socket, one JSON
// request and one response line at a time (see gateway/control_protocol.hpp).
//
// Thread model: used by the blockway command on its main thread only.
#pragma once

#include "cli/exit_codes.hpp"

#include <nlohmann/json.hpp>

#include <stdexcept>
#include <string>

namespace blockway::cli {

using Json = nlohmann::json;

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
