#include "nbd/kernel_devices.hpp"

#include "core/logging.hpp"
#include "nbd/kernel_netlink.hpp"
#include "nbd/protocol.hpp"

#include <boost/asio/post.hpp>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace blockway::nbd {

struct KernelDevices::Device {
  DeviceRecord record;
  std::shared_ptr<core::Export> exp;
  bool disconnecting = false;
};

namespace {

// The kernel takes 512..PAGE_SIZE, a power of two.
uint32_t kernel_block_size(uint32_t min_block) {
  uint32_t b = 512;
  while (b < min_block && b < 4096) b <<= 1;
  return b;
}

// Kernels before 6.x ignore NBD_FLAG_ROTATIONAL (Debian 12's 6.1 always says
// non-rotational): the queue's sysfs attribute says it on every kernel.
void set_rotational(uint32_t index, bool rotational, spdlog::logger& log) {
  if (!rotational) return;
  const std::string path = "/sys/block/nbd" + std::to_string(index) + "/queue/rotational";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0 || ::write(fd, "1", 1) != 1) log.warn("{}: cannot mark the device rotational: {}", path, std::strerror(errno));
  if (fd >= 0) ::close(fd);
}

void close_all(const std::vector<int>& fds) {
  for (int fd : fds) ::close(fd);
}

}  // namespace

KernelDevices::KernelDevices(core::EventLoops& loops, core::ExportTable& exports, Server& server)
    : loops_(loops), exports_(exports), server_(server), log_(core::logger("kernel")) {}

KernelDevices::~KernelDevices() { stop(); }

Negotiated KernelDevices::negotiated_for(const Device& dev) const {
  Negotiated neg;
  neg.exp = dev.exp;
  neg.structured_replies = false;  // the kernel speaks simple replies only
  neg.transmission_flags = dev.record.flags;
  return neg;
}

// Makes `count` socketpairs, serves the daemon's ends, returns the kernel's.
std::vector<int> KernelDevices::start_connections(const std::shared_ptr<Device>& dev, unsigned count,
                                                 const Abandoned& abandoned) {
  std::vector<int> theirs;
  std::vector<int> ours;
  for (unsigned i = 0; i < count; ++i) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
      const int err = errno;
      close_all(theirs);
      close_all(ours);
      throw KernelNbdError(err, std::string("cannot make a socketpair: ") + std::strerror(err));
    }
    // A Unix socket's default send buffer (~200 KiB) splits a 1 MiB reply
    // into several wakeups of the kernel's receiver; TCP on loopback grows
    // its buffers, a socketpair does not. As root the limit does not apply.
    const int bytes = 4 << 20;
    for (int fd : sv)
      if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0)
        ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
    ours.push_back(sv[0]);
    theirs.push_back(sv[1]);
  }
  const uint32_t index = dev->record.index;
  {
    std::lock_guard lock(mutex_);
    dev->record.live += count;
  }
  for (int fd : ours) {
    server_.serve_attached(fd, negotiated_for(*dev), "/dev/nbd" + std::to_string(index),
                           [this, index, abandoned] { connection_ended(index, abandoned); });
  }
  return theirs;
}

DeviceRecord KernelDevices::connect(const std::string& name, DeviceOptions options) {
  auto exp = exports_.find(name);
  if (!exp) throw std::invalid_argument("no export named '" + name + "'");
  {
    std::lock_guard lock(mutex_);
    if (stopping_) throw KernelNbdError(ESHUTDOWN, "the daemon is shutting down");
    if (options.index && devices_.contains(*options.index))
      throw KernelNbdError(EBUSY, "/dev/nbd" + std::to_string(*options.index) + " is already attached to export '" +
                                      devices_.at(*options.index)->record.export_name + "'");
  }
  const auto caps = exp->device->capabilities();
  const auto geo = exp->device->geometry();
  if (options.connections == 0) options.connections = caps.multi_conn ? static_cast<unsigned>(loops_.size()) : 1;
  if (options.connections > 1 && !caps.multi_conn)
    throw std::invalid_argument("export '" + name + "' does not allow multi-conn: connections must be 1");
  if (options.connections > 64) throw std::invalid_argument("connections must be 1..64");
  if (options.dead_conn_timeout_s == 0) throw std::invalid_argument("dead-conn-timeout must be at least 1 second");

  auto dev = std::make_shared<Device>();
  dev->exp = exp;
  dev->record.export_name = name;
  dev->record.options = options;
  dev->record.size = geo.size;
  dev->record.block_size = kernel_block_size(geo.min_block);
  uint16_t flags = transmission_flags(caps, false) & ~(kFlagSendCache | kFlagSendFastZero);
  if (options.read_only) flags = (flags | kFlagReadOnly) & ~(kFlagSendTrim | kFlagSendWriteZeroes);
  if (options.rotational) flags |= kFlagRotational;
  dev->record.flags = flags;
  if (geo.size % dev->record.block_size != 0)
    throw std::invalid_argument("export '" + name + "' is " + std::to_string(geo.size) +
                                " bytes, not a multiple of the device's block size " +
                                std::to_string(dev->record.block_size));

  // The sessions start before the kernel has the other ends: they wait for
  // requests. Registered under a placeholder index until the kernel names it.
  dev->record.index = options.index.value_or(UINT32_MAX);
  auto abandoned = std::make_shared<std::atomic<bool>>(false);
  std::vector<int> theirs = start_connections(dev, options.connections, abandoned);
  KernelConnect params;
  params.index = options.index;
  params.size_bytes = geo.size;
  params.block_size = dev->record.block_size;
  params.server_flags = flags;
  params.timeout_s = options.timeout_s;
  params.dead_conn_timeout_s = options.dead_conn_timeout_s;
  params.sockets = theirs;
  uint32_t index = 0;
  try {
    index = KernelNbd::connect(params);
  } catch (...) {
    // Closing the kernel's ends ends our sessions.
    abandoned->store(true);
    close_all(theirs);
    throw;
  }
  close_all(theirs);  // the kernel holds its own references
  {
    std::lock_guard lock(mutex_);
    dev->record.index = index;
    dev->record.options.index = index;
    devices_[index] = dev;
  }
  set_rotational(index, options.rotational, *log_);
  log_->info("export '{}' attached as /dev/nbd{} ({} bytes, block {}, {} connection{}{})", name, index, geo.size,
             dev->record.block_size, options.connections, options.connections == 1 ? "" : "s",
             (flags & kFlagReadOnly) ? ", read-only" : "");
  std::lock_guard lock(mutex_);
  return dev->record;
}

void KernelDevices::connection_ended(uint32_t index, const Abandoned& abandoned) {
  std::lock_guard lock(mutex_);
  auto it = devices_.find(index);
  if (it == devices_.end()) return;  // a failed connect, or disconnected
  auto& dev = *it->second;
  if (dev.record.live > 0) --dev.record.live;
  if (abandoned->load() || stopping_ || dev.disconnecting) return;
  // The kernel shut the socket (a request timed out) or the session broke:
  // the device waits for a new connection, which the blocking pool gives it.
  boost::asio::post(loops_.blocking(), [this, index] { replace_connection(index); });
}

void KernelDevices::replace_connection(uint32_t index) {
  std::shared_ptr<Device> dev;
  {
    std::lock_guard lock(mutex_);
    auto it = devices_.find(index);
    if (it == devices_.end() || stopping_ || it->second->disconnecting) return;
    dev = it->second;
  }
  // The kernel marks the old socket dead from its receive thread, which may
  // not have run yet: until then RECONFIGURE finds no slot (ENOSPC).
  for (int attempt = 0;; ++attempt) {
    auto abandoned = std::make_shared<std::atomic<bool>>(false);
    std::vector<int> theirs;
    try {
      theirs = start_connections(dev, 1, abandoned);
      KernelNbd::reconfigure(index, theirs, dev->record.options.dead_conn_timeout_s);
      close_all(theirs);
      std::lock_guard lock(mutex_);
      ++dev->record.reconnects;
      log_->info("/dev/nbd{}: a connection ended; the kernel has a new one", index);
      return;
    } catch (const KernelNbdError& e) {
      abandoned->store(true);
      close_all(theirs);
      if (e.errno_value != ENOSPC || attempt >= 50) {
        log_->warn("/dev/nbd{}: cannot replace a connection ({}); the device is left to the kernel", index, e.what());
        std::lock_guard lock(mutex_);
        devices_.erase(index);
        return;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void KernelDevices::disconnect(uint32_t index, bool force) {
  std::shared_ptr<Device> dev;
  {
    std::lock_guard lock(mutex_);
    auto it = devices_.find(index);
    if (it == devices_.end())
      throw KernelNbdError(ENOENT, "/dev/nbd" + std::to_string(index) + " is not attached by this daemon");
    dev = it->second;
  }
  const std::string path = "/dev/nbd" + std::to_string(index);
  if (!force) {
    // An exclusive open fails while the device is mounted or held open
    // exclusively (a filesystem, LVM, another O_EXCL user).
    const int fd = ::open(path.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC);
    if (fd < 0 && errno == EBUSY)
      throw KernelNbdError(EBUSY, path + " is in use (mounted?): unmount it first, or use --force");
    if (fd >= 0) ::close(fd);
  }
  {
    std::lock_guard lock(mutex_);
    dev->disconnecting = true;
  }
  try {
    KernelNbd::disconnect(index);
  } catch (...) {
    std::lock_guard lock(mutex_);
    dev->disconnecting = false;
    throw;
  }
  std::lock_guard lock(mutex_);
  devices_.erase(index);
  log_->info("{} detached (export '{}')", path, dev->record.export_name);
}

std::string KernelDevices::restore(const DeviceRecord& saved) {
  const auto state = KernelNbd::connected(saved.index);
  if (!state || !*state) {
    // The kernel gave up waiting (or rebooted): attach it again.
    connect(saved.export_name, saved.options);
    return "connected again";
  }
  auto exp = exports_.find(saved.export_name);
  if (!exp) throw std::invalid_argument("no export named '" + saved.export_name + "'");
  const auto geo = exp->device->geometry();
  if (geo.size != saved.size)
    throw std::invalid_argument("export '" + saved.export_name + "' is now " + std::to_string(geo.size) +
                                " bytes, the device " + std::to_string(saved.size) + ": disconnect it");
  auto dev = std::make_shared<Device>();
  dev->exp = exp;
  dev->record = saved;
  dev->record.live = 0;
  dev->record.reconnects = 0;
  {
    std::lock_guard lock(mutex_);
    if (devices_.contains(saved.index)) return "attached already";
    devices_[saved.index] = dev;
  }
  for (int attempt = 0;; ++attempt) {
    auto abandoned = std::make_shared<std::atomic<bool>>(false);
    std::vector<int> theirs;
    try {
      theirs = start_connections(dev, std::max(1u, saved.options.connections), abandoned);
      KernelNbd::reconfigure(saved.index, theirs, saved.options.dead_conn_timeout_s);
      close_all(theirs);
      break;
    } catch (const KernelNbdError& e) {
      abandoned->store(true);
      close_all(theirs);
      // ENOSPC: the kernel has not yet noticed all the old sockets died.
      if (e.errno_value != ENOSPC || attempt >= 100) {
        std::lock_guard lock(mutex_);
        devices_.erase(saved.index);
        throw;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  set_rotational(saved.index, saved.options.rotational, *log_);
  log_->info("/dev/nbd{}: export '{}' reconnected after the restart", saved.index, saved.export_name);
  return "reconnected";
}

std::vector<DeviceRecord> KernelDevices::list() const {
  std::lock_guard lock(mutex_);
  std::vector<DeviceRecord> out;
  for (const auto& [i, d] : devices_) out.push_back(d->record);
  return out;
}

std::optional<DeviceRecord> KernelDevices::find(uint32_t index) const {
  std::lock_guard lock(mutex_);
  auto it = devices_.find(index);
  if (it == devices_.end()) return std::nullopt;
  return it->second->record;
}

std::vector<uint32_t> KernelDevices::attached_to(const std::string& name) const {
  std::lock_guard lock(mutex_);
  std::vector<uint32_t> out;
  for (const auto& [i, d] : devices_)
    if (d->record.export_name == name) out.push_back(i);
  return out;
}

void KernelDevices::stop() {
  std::lock_guard lock(mutex_);
  stopping_ = true;
}

}  // namespace blockway::nbd
