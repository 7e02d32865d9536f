// Kernel devices on the control plane and at start: `device-connect`,
// `device-disconnect` and `devices`; the catalogue's record of attached
// devices (kernel_devices table), restored at start before the [[device]]
// entries of the configuration are attached.
//
// Thread model: commands run on an event loop and move every netlink and
// catalogue call to the blocking pool; start() runs on the main thread
// before the loops do.
#pragma once

#include "gateway/config.hpp"
#include "gateway/control_protocol.hpp"
#include "gateway/runtime_exports.hpp"
#include "nbd/kernel_devices.hpp"

#include <map>
#include <string>

namespace blockway::gateway {

// The options of `blockway connect` / [[device]] (device, connections,
// read-only, rotational, dead-conn-timeout, timeout). Throws ConfigError
// naming `where` and the option.
nbd::DeviceOptions parse_device_options(const std::map<std::string, std::string>& options, const std::string& where);

class DeviceCommands {
 public:
  DeviceCommands(nbd::KernelDevices& devices, RuntimeExports& runtime, StackBuilder& builder,
                 core::EventLoops& loops);

  // Reconnects the devices the catalogue names (logging those that cannot
  // be), then attaches the configured ones not attached yet. Throws
  // ConfigError for a configured device that cannot be attached. The
  // devices of an export that failed to open (RuntimeExports::is_failed)
  // wait for it instead: attach_waiting().
  void start(const std::vector<DeviceConfig>& configured);
  // Attaches the devices that wait for export `name`, which a retry has just
  // opened: those the catalogue names, then the configured ones. Loop 0; the
  // netlink calls run on the blocking pool.
  void attach_waiting(const std::string& name);
  void add_to(ControlDispatcher& dispatcher);
  // "/dev/nbd0 /dev/nbd2" for export `name`, empty if none.
  [[nodiscard]] std::string devices_of(const std::string& name) const;

 private:
  core::Task<Json> connect(const Json& req);
  core::Task<Json> disconnect(const Json& req);
  core::Task<Json> list(const Json& req);
  void save(cache::MetaStore* store, const nbd::DeviceRecord& record);
  core::Task<void> attach(std::vector<nbd::DeviceRecord> saved, std::vector<nbd::DeviceOptions> configured,
                          std::string name);

  nbd::KernelDevices& devices_;
  RuntimeExports& runtime_;
  StackBuilder& builder_;
  core::EventLoops& loops_;
  std::shared_ptr<spdlog::logger> log_;
  // Devices whose export failed to open at start, by export name: records
  // from the catalogue and configured devices' options. Main thread at
  // start, loop 0 after.
  std::multimap<std::string, nbd::DeviceRecord> waiting_saved_;
  std::multimap<std::string, nbd::DeviceOptions> waiting_configured_;
};

// One device as `devices` reports it and the catalogue keeps it.
Json device_json(const nbd::DeviceRecord& record);
nbd::DeviceRecord device_from_json(const Json& j);

}  // namespace blockway::gateway
