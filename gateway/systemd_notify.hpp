// SystemdNotify: the service manager's notification protocol (sd_notify(3)),
// spoken directly: one datagram of "KEY=VALUE" lines to the Unix socket named
// by $NOTIFY_SOCKET (a path, or "@name" in the abstract namespace). Written
// here instead of linking libsystemd: the protocol is a documented stable
// datagram, and the daemon keeps no dependency on systemd when it runs
// without it. With no NOTIFY_SOCKET every call does nothing.
//
// Thread model: construct at start-up on the main thread; send() may then be
// called from any thread (one sendto() a call, no shared state).
#pragma once

#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace blockway::gateway {

class SystemdNotify {
 public:
  // Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, and removes them
  // from the environment (children must not notify in our name). A
  // malformed value is logged and ignored: the daemon runs as without systemd.
  SystemdNotify();
  ~SystemdNotify();
  SystemdNotify(const SystemdNotify&) = delete;
  SystemdNotify& operator=(const SystemdNotify&) = delete;

  [[nodiscard]] bool enabled() const noexcept { return fd_ >= 0; }
  // The watchdog interval systemd expects pings within (WatchdogSec=), if it
  // asked this process for them.
  [[nodiscard]] std::optional<std::chrono::microseconds> watchdog() const noexcept { return watchdog_; }

  // Sends "READY=1", "STATUS=...", "STOPPING=1", "WATCHDOG=1" (lines joined
  // by '\n'). Returns false if it could not be sent (logged once).
  bool send(std::string_view state) const;

  // The socket address of a NOTIFY_SOCKET value, for tests: "/path" or
  // "@abstract". nullopt if it is neither or too long.
  static std::optional<std::string> socket_path(std::string_view value);
  // WATCHDOG_USEC / WATCHDOG_PID as systemd sets them: the interval, if it is
  // meant for process `self`. nullopt otherwise (unset, another pid, bad text).
  static std::optional<std::chrono::microseconds> watchdog_interval(const char* usec, const char* pid, long self);

 private:
  int fd_ = -1;
  std::string address_;  // sun_path bytes ('\0' first for abstract names)
  std::optional<std::chrono::microseconds> watchdog_;
  mutable std::atomic<bool> warned_{false};
};

}  // namespace blockway::gateway
