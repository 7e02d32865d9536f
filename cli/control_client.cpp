#include "cli/control_client.hpp"

#include "core/paths.hpp"

#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace blockway::cli {

std::string control_socket_path(const std::string& from_option) {
  if (!from_option.empty()) return from_option;
  if (const char* env = std::getenv("BLOCKWAY_SOCKET"); env && *env) return env;
  return core::default_control_socket();
}

ControlClient::ControlClient(const std::string& path) : path_(path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) throw CliError(kUsage, "socket path is too long: " + path);
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) throw CliError(kNoDaemon, std::string("cannot create a socket: ") + std::strerror(errno));
  if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int e = errno;
    ::close(fd_);
    fd_ = -1;
    std::string why;
    if (e == ENOENT || e == ECONNREFUSED)
      why = "blockwayd is not running (nothing listens on " + path + ")";
    else if (e == EACCES || e == EPERM)
      why = "permission denied on " + path + " (the control socket is root-only by default)";
    else
      why = "cannot connect to " + path + ": " + std::strerror(e);
    throw CliError(kNoDaemon, why + "; use --socket PATH or BLOCKWAY_SOCKET if the daemon listens elsewhere");
  }
}

ControlClient::~ControlClient() {
  if (fd_ >= 0) ::close(fd_);
}

void ControlClient::set_timeout(double seconds) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1;
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

Json ControlClient::call(const std::string& cmd, Json args) {
  args["cmd"] = cmd;
  std::string line = args.dump() + "\n";
  for (size_t off = 0; off < line.size();) {
    const ssize_t n = ::send(fd_, line.data() + off, line.size() - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        throw CliError(kTimedOut, "the daemon did not take the request in time");
      throw CliError(kNoDaemon, "the daemon closed the control connection: " + std::string(std::strerror(errno)));
    }
    off += static_cast<size_t>(n);
  }
  size_t nl;
  while ((nl = buffer_.find('\n')) == std::string::npos) {
    char chunk[65536];
    const ssize_t n = ::read(fd_, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
      throw CliError(kTimedOut, "the daemon did not answer in time");
    if (n <= 0) throw CliError(kNoDaemon, "the daemon closed the control connection without an answer");
    buffer_.append(chunk, static_cast<size_t>(n));
  }
  const std::string reply = buffer_.substr(0, nl);
  buffer_.erase(0, nl + 1);
  Json response = Json::parse(reply, nullptr, false);
  if (response.is_discarded() || !response.is_object() || !response.contains("ok"))
    throw CliError(kProtocol, "the daemon sent an answer that is not a control response: " + reply.substr(0, 200));
  if (response["ok"] == true) return response.contains("result") ? response["result"] : Json::object();
  const Json err = response.value("error", Json::object());
  const std::string code = err.value("code", "");
  const std::string message = err.value("message", "unknown error");
  int exit_code = kFailed;
  if (code == "unknown-export") exit_code = kUnknownExport;
  else if (code == "refused" || code == "no-cache") exit_code = kRefused;
  else if (code == "bad-request") exit_code = kUsage;
  else if (code == "unknown-command" || code == "too-large") exit_code = kProtocol;
  throw CliError(exit_code, message);
}

}  // namespace blockway::cli
