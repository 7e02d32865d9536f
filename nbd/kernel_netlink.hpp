// KernelNbd: the kernel's generic netlink NBD interface (family "nbd", see
// linux/nbd-netlink.h): attach sockets to /dev/nbdN (CONNECT), give a
// device whose server went away fresh sockets (RECONFIGURE), detach
// (DISCONNECT) and ask which devices are connected (STATUS).
//
// Raw netlink, no library: a handful of attributes in four messages. Every
// call opens its own netlink socket and waits for the kernel's
// acknowledgement, so it blocks (briefly): call it from a blocking thread,
// never from an event loop. Errors are thrown as KernelNbdError with a
// message that says what to do (load the module, run as root, pick another
// device).
//
// Thread model: stateless; any thread, many calls at once.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace blockway::nbd {

struct KernelNbdError : std::runtime_error {
  KernelNbdError(int errno_value_, const std::string& message)
      : std::runtime_error(message), errno_value(errno_value_) {}
  int errno_value;
};

struct KernelConnect {
  std::optional<uint32_t> index;  // /dev/nbdN; unset: the kernel picks a free one
  uint64_t size_bytes = 0;
  uint64_t block_size = 512;     // logical block size: a power of two, 512..4096
  uint64_t server_flags = 0;     // NBD_FLAG_* transmission flags
  uint64_t timeout_s = 0;        // per-request timeout: in-flight requests are re-sent after it
  uint64_t dead_conn_timeout_s = 0;  // how long I/O waits for a new server
  std::vector<int> sockets;      // the kernel's ends; the caller keeps and closes its copies
};

class KernelNbd {
 public:
  // Returns the index of the device connected.
  static uint32_t connect(const KernelConnect& params);
  // New sockets for a connected device whose connections died.
  static void reconfigure(uint32_t index, const std::vector<int>& sockets, uint64_t dead_conn_timeout_s);
  static void disconnect(uint32_t index);
  // Whether /dev/nbdN has sockets attached (nullopt: no such device).
  static std::optional<bool> connected(uint32_t index);
};

// "/dev/nbd3" or "nbd3" or "3" -> 3; nullopt for anything else.
std::optional<uint32_t> parse_nbd_device(const std::string& text);

}  // namespace blockway::nbd
