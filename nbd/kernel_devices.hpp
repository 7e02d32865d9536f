// KernelDevices: exports attached as kernel block devices (/dev/nbdN).
//
// For each device the daemon makes one socketpair per connection, hands one
// end to the kernel by netlink (KernelNbd) and serves the other in-process
// with the same Session code as TCP clients, entered directly in
// transmission (the kernel does no handshake: size, block size and
// transmission flags travel in the netlink message). When the daemon stops,
// the kernel keeps the device and holds its I/O for dead_conn_timeout; the
// next daemon restores it (restore(): NBD_CMD_STATUS, then fresh sockets by
// NBD_CMD_RECONFIGURE), so a mounted filesystem sees a pause, not an error.
// A connection that ends while the daemon runs (the kernel timed a request
// out and shut the socket) is replaced the same way.
//
// Thread model: connect/disconnect/restore/list block on netlink: call them
// from the blocking pool or the main thread before the loops run, never from
// an event loop. The device table is guarded by a mutex. Session-end
// callbacks arrive on event loops and post the replacement to the blocking
// pool.
#pragma once

#include "core/event_loops.hpp"
#include "core/export.hpp"
#include "nbd/server.hpp"

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace blockway::nbd {

struct DeviceOptions {
  std::optional<uint32_t> index;  // unset: the kernel picks a free /dev/nbdN
  unsigned connections = 0;       // 0: the event loop count if the export allows multi-conn, else 1
  bool read_only = false;         // the device is read-only even if the export is not
  bool rotational = false;        // the kernel reports a rotational disk
  uint32_t dead_conn_timeout_s = 120;  // I/O waits this long for a (re)started daemon
  uint32_t timeout_s = 5;         // a request unanswered this long is re-sent on a new connection
};

// One attached device as the catalogue keeps it (and `devices` reports it).
struct DeviceRecord {
  uint32_t index = 0;
  std::string export_name;
  DeviceOptions options;  // index, connections resolved
  uint64_t size = 0;
  uint32_t block_size = 0;
  uint16_t flags = 0;     // transmission flags given to the kernel
  unsigned live = 0;      // connections served right now
  unsigned reconnects = 0;  // connections replaced (after a restart or a timeout)
};

class KernelDevices {
 public:
  KernelDevices(core::EventLoops& loops, core::ExportTable& exports, Server& server);
  ~KernelDevices();

  // Attaches export `name`. Throws KernelNbdError (errno, message) for the
  // kernel's refusals and std::invalid_argument for an unknown export or
  // bad options.
  DeviceRecord connect(const std::string& name, DeviceOptions options);
  // Detaches /dev/nbdN. Unless forced, refused (EBUSY) while the device is
  // open elsewhere (mounted, in use): the kernel would fail that user's I/O.
  void disconnect(uint32_t index, bool force);
  // After a restart: gives a device the previous daemon attached fresh
  // sockets if the kernel still holds it, or attaches it again (at the same
  // index) if the kernel gave up. Returns what happened ("reconnected",
  // "connected again"); throws like connect().
  std::string restore(const DeviceRecord& saved);
  [[nodiscard]] std::vector<DeviceRecord> list() const;
  [[nodiscard]] std::optional<DeviceRecord> find(uint32_t index) const;
  // Devices attached to export `name`.
  [[nodiscard]] std::vector<uint32_t> attached_to(const std::string& name) const;
  // The daemon is stopping: connections that end are not replaced, and the
  // kernel keeps the devices for the next daemon.
  void stop();

 private:
  struct Device;
  // `abandoned` is set when the kernel did not take the sockets: the
  // sessions' end then means nothing.
  using Abandoned = std::shared_ptr<std::atomic<bool>>;
  std::vector<int> start_connections(const std::shared_ptr<Device>& dev, unsigned count, const Abandoned& abandoned);
  void connection_ended(uint32_t index, const Abandoned& abandoned);
  void replace_connection(uint32_t index);
  Negotiated negotiated_for(const Device& dev) const;

  core::EventLoops& loops_;
  core::ExportTable& exports_;
  Server& server_;
  std::shared_ptr<spdlog::logger> log_;
  mutable std::mutex mutex_;
  std::map<uint32_t, std::shared_ptr<Device>> devices_;
  bool stopping_ = false;
};

}  // namespace blockway::nbd
