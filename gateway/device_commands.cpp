#include "gateway/device_commands.hpp"

#include "core/options.hpp"
#include "nbd/kernel_netlink.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>

#include <cerrno>
#include <chrono>

namespace blockway::gateway {

using core::ConfigError;
using core::offload;
using core::Task;

nbd::DeviceOptions parse_device_options(const std::map<std::string, std::string>& options, const std::string& where) {
  nbd::DeviceOptions o;
  for (const auto& [key, value] : options) {
    const std::string what = where + ": " + key;
    if (key == "device") {
      o.index = nbd::parse_nbd_device(value);
      if (!o.index) throw ConfigError(what + " '" + value + "' is not an NBD device like /dev/nbd0");
    } else if (key == "connections") {
      o.connections = static_cast<unsigned>(core::parse_number(value, what, 1, 64));
    } else if (key == "read-only") {
      o.read_only = core::parse_bool(value, what);
    } else if (key == "rotational") {
      o.rotational = core::parse_bool(value, what);
    } else if (key == "dead-conn-timeout") {
      o.dead_conn_timeout_s = static_cast<uint32_t>(core::parse_number(value, what, 1, 365 * 86400));
    } else if (key == "timeout") {
      o.timeout_s = static_cast<uint32_t>(core::parse_number(value, what, 1, 86400));
    } else {
      throw ConfigError(where + ": unknown option '" + key +
                        "' (device, connections, read-only, rotational, dead-conn-timeout, timeout)");
    }
  }
  return o;
}

Json device_json(const nbd::DeviceRecord& r) {
  Json j;
  j["device"] = "/dev/nbd" + std::to_string(r.index);
  j["index"] = r.index;
  j["export"] = r.export_name;
  j["size"] = r.size;
  j["block_size"] = r.block_size;
  j["flags"] = r.flags;
  j["read_only"] = (r.flags & 2) != 0;
  j["connections"] = r.options.connections;
  j["live_connections"] = r.live;
  j["reconnects"] = r.reconnects;
  j["rotational"] = r.options.rotational;
  j["dead_conn_timeout"] = r.options.dead_conn_timeout_s;
  j["timeout"] = r.options.timeout_s;
  return j;
}

nbd::DeviceRecord device_from_json(const Json& j) {
  nbd::DeviceRecord r;
  r.index = j.at("index").get<uint32_t>();
  r.export_name = j.at("export").get<std::string>();
  r.size = j.at("size").get<uint64_t>();
  r.block_size = j.at("block_size").get<uint32_t>();
  r.flags = j.at("flags").get<uint16_t>();
  r.options.index = r.index;
  r.options.connections = j.at("connections").get<unsigned>();
  r.options.read_only = (r.flags & 2) != 0;
  r.options.rotational = j.at("rotational").get<bool>();
  r.options.dead_conn_timeout_s = j.at("dead_conn_timeout").get<uint32_t>();
  r.options.timeout_s = j.at("timeout").get<uint32_t>();
  return r;
}

DeviceCommands::DeviceCommands(nbd::KernelDevices& devices, RuntimeExports& runtime, StackBuilder& builder,
                               core::EventLoops& loops)
    : devices_(devices), runtime_(runtime), builder_(builder), loops_(loops), log_(core::logger("kernel")) {}

void DeviceCommands::save(cache::MetaStore* store, const nbd::DeviceRecord& record) {
  if (!store) return;
  try {
    Json j = device_json(record);
    j.erase("live_connections");
    j.erase("reconnects");
    store->save_kernel_device(record.index, j.dump());
  } catch (const std::exception& e) {
    log_->error("/dev/nbd{}: not saved in the catalogue, so the next start will not reconnect it: {}", record.index,
                e.what());
  }
}

void DeviceCommands::start(const std::vector<DeviceConfig>& configured) {
  // Options checked before anything is opened or attached.
  std::vector<nbd::DeviceOptions> options;
  for (const auto& d : configured)
    options.push_back(parse_device_options(d.options, "[[device]] export '" + d.export_name + "'"));
  cache::MetaStore* store = nullptr;
  if (builder_.catalogue_exists() || !configured.empty()) store = &builder_.catalogue();
  if (store) {
    for (const auto& [index, text] : store->kernel_devices()) {
      try {
        const auto saved = device_from_json(Json::parse(text));
        if (runtime_.is_failed(saved.export_name)) {
          log_->warn("/dev/nbd{}: export '{}' is not open yet: reconnected once it opens", index, saved.export_name);
          waiting_saved_.emplace(saved.export_name, saved);
          continue;
        }
        const std::string what = devices_.restore(saved);
        log_->info("/dev/nbd{} (export '{}'): {}", index, saved.export_name, what);
        if (auto now = devices_.find(index)) save(store, *now);
      } catch (const std::exception& e) {
        // Kept in the catalogue: the export may be back at the next start.
        log_->error("/dev/nbd{}: cannot reconnect it: {}", index, e.what());
      }
    }
  }
  for (size_t k = 0; k < configured.size(); ++k) {
    const auto& d = configured[k];
    const std::string where = "[[device]] export '" + d.export_name + "'";
    bool attached = false;
    for (uint32_t i : devices_.attached_to(d.export_name))
      if (!options[k].index || *options[k].index == i) attached = true;
    if (attached) continue;
    if (runtime_.is_failed(d.export_name)) {
      log_->warn("{}: the export is not open yet: attached once it opens", where);
      waiting_configured_.emplace(d.export_name, options[k]);
      continue;
    }
    try {
      save(store, devices_.connect(d.export_name, options[k]));
    } catch (const std::exception& e) {
      throw ConfigError(where + ": " + e.what());
    }
  }
}

void DeviceCommands::attach_waiting(const std::string& name) {
  std::vector<nbd::DeviceRecord> saved;
  std::vector<nbd::DeviceOptions> configured;
  for (auto [it, end] = waiting_saved_.equal_range(name); it != end; ++it) saved.push_back(it->second);
  for (auto [it, end] = waiting_configured_.equal_range(name); it != end; ++it) configured.push_back(it->second);
  waiting_saved_.erase(name);
  waiting_configured_.erase(name);
  if (saved.empty() && configured.empty()) return;
  boost::asio::co_spawn(loops_.at(0), attach(std::move(saved), std::move(configured), name), boost::asio::detached);
}

Task<void> DeviceCommands::attach(std::vector<nbd::DeviceRecord> saved, std::vector<nbd::DeviceOptions> configured,
                                  std::string name) {
  cache::MetaStore* store = co_await runtime_.open_catalogue();
  auto work = [this, store, &saved, &configured, &name] {
    for (const auto& record : saved) {
      try {
        log_->info("/dev/nbd{} (export '{}'): {}", record.index, name, devices_.restore(record));
        if (auto now = devices_.find(record.index)) save(store, *now);
      } catch (const std::exception& e) {
        log_->error("/dev/nbd{}: cannot reconnect it: {}", record.index, e.what());
      }
    }
    for (const auto& options : configured) {
      bool attached = false;
      for (uint32_t i : devices_.attached_to(name))
        if (!options.index || *options.index == i) attached = true;
      if (attached) continue;
      try {
        const auto record = devices_.connect(name, options);
        save(store, record);
        log_->info("/dev/nbd{}: export '{}' attached", record.index, name);
      } catch (const std::exception& e) {
        log_->error("[[device]] export '{}': cannot attach it: {}", name, e.what());
      }
    }
    return 0;
  };
  auto attaching = offload(loops_.blocking(), std::move(work));  // named: GCC 12, see RuntimeExports::add()
  co_await std::move(attaching);
}

Task<Json> DeviceCommands::connect(const Json& req) {
  struct Job {
    std::string name;
    nbd::DeviceOptions options;
    nbd::DeviceRecord record;
    int err = 0;
    std::string error;
    cache::MetaStore* store = nullptr;
  } job;
  job.name = arg_string(req, "name");
  std::map<std::string, std::string> options;
  if (req.contains("options")) {
    if (!req["options"].is_object()) throw ControlError("bad-request", EINVAL, "options must be an object");
    for (const auto& [k, v] : req["options"].items())
      options[k] = v.is_string() ? v.get<std::string>() : v.dump();
  }
  try {
    job.options = parse_device_options(options, "connect");
  } catch (const ConfigError& e) {
    throw ControlError("bad-request", EINVAL, e.what());
  }
  job.store = co_await runtime_.open_catalogue();
  Job* j = &job;
  co_await offload(loops_.blocking(), [this, j] {
    try {
      j->record = devices_.connect(j->name, j->options);
      save(j->store, j->record);
    } catch (const nbd::KernelNbdError& e) {
      j->err = e.errno_value;
      j->error = e.what();
    } catch (const std::invalid_argument& e) {
      j->err = ENOENT;
      j->error = e.what();
    }
    return 0;
  });
  if (job.err == ENOENT && job.error.starts_with("no export"))
    throw ControlError("unknown-export", ENOENT, job.error);
  if (job.err) throw ControlError(job.err == EINVAL ? "bad-request" : "refused", job.err, job.error);
  co_return device_json(job.record);
}

Task<Json> DeviceCommands::disconnect(const Json& req) {
  struct Job {
    uint32_t index = 0;
    bool force = false;
    std::optional<nbd::DeviceRecord> record;
    int err = 0;
    std::string error;
    cache::MetaStore* store = nullptr;
  } job;
  const std::string device = arg_string(req, "device");
  const auto index = nbd::parse_nbd_device(device);
  if (!index) throw ControlError("bad-request", EINVAL, "'" + device + "' is not an NBD device like /dev/nbd0");
  job.index = *index;
  job.force = arg_bool(req, "force", false);
  job.record = devices_.find(job.index);
  job.store = builder_.open_catalogue_or_null();
  Job* j = &job;
  co_await offload(loops_.blocking(), [this, j] {
    try {
      devices_.disconnect(j->index, j->force);
      if (j->store) j->store->remove_kernel_device(j->index);
    } catch (const nbd::KernelNbdError& e) {
      j->err = e.errno_value;
      j->error = e.what();
    } catch (const std::exception& e) {
      j->err = EIO;
      j->error = e.what();
    }
    return 0;
  });
  if (job.err) throw ControlError(job.err == EIO ? "failed" : "refused", job.err, job.error);
  Json out;
  out["device"] = "/dev/nbd" + std::to_string(job.index);
  if (job.record) out["export"] = job.record->export_name;
  co_return out;
}

Task<Json> DeviceCommands::list(const Json&) {
  Json arr = Json::array();
  for (const auto& r : devices_.list()) arr.push_back(device_json(r));
  co_return Json{{"devices", arr}};
}

std::string DeviceCommands::devices_of(const std::string& name) const {
  std::string out;
  for (uint32_t i : devices_.attached_to(name)) out += (out.empty() ? "" : " ") + ("/dev/nbd" + std::to_string(i));
  return out;
}

void DeviceCommands::add_to(ControlDispatcher& dispatcher) {
  dispatcher.add("device-connect", "attach an export as a kernel NBD device {name, options?}",
                 [this](const Json& req) { return connect(req); });
  dispatcher.add("device-disconnect", "detach a kernel NBD device {device, force?}",
                 [this](const Json& req) { return disconnect(req); });
  dispatcher.add("devices", "the kernel NBD devices this daemon serves", [this](const Json& req) { return list(req); });
}

}  // namespace blockway::gateway
