#include "gateway/control_protocol.hpp"

#include "core/async_mutex.hpp"
#include "core/logging.hpp"
#include "core/options.hpp"
#include "core/snapshot_control.hpp"
#include "gateway/config.hpp"
#include "remote/uri.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>
#include <unistd.h>

namespace blockway::gateway {

using core::AsyncMutex;
using core::ConfigError;
using core::ControlResult;
using core::Export;
using core::ExportControl;
using core::ExportTable;
using core::PrefetchOrder;
using core::PrefetchState;
using core::parse_size;
using core::PrefetchStatus;
using core::Task;

namespace {

[[noreturn]] void bad_request(const std::string& message) { throw ControlError("bad-request", EINVAL, message); }

// The saved export by that name that failed to open, or null.
Json failed_entry(const ExportCommandHooks& hooks, const std::string& name) {
  if (!hooks.failed_exports || name.empty()) return nullptr;
  for (auto& e : hooks.failed_exports())
    if (e.value("name", "") == name) return e;
  return nullptr;
}

std::shared_ptr<Export> find_export(ExportTable& exports, const Json& request, const ExportCommandHooks& hooks = {}) {
  const auto name = arg_string(request, "name");
  auto exp = name.empty() ? nullptr : exports.find(name);
  if (!exp) {
    if (const Json failed = failed_entry(hooks, name); !failed.is_null())
      throw ControlError("refused", ENODEV,
                         "export '" + name + "' is not open (" + failed.value("state", "failed") +
                             "); fix the cause and restart the daemon, or drop it with export remove");
    throw ControlError("unknown-export", ENOENT, "no export named '" + name + "'");
  }
  return exp;
}

ExportControl& control_of(const Export& exp) {
  if (!exp.control)
    throw ControlError("no-cache", EOPNOTSUPP,
                       "export '" + exp.name + "' has no cache under run-time control: prefetch, detach and "
                       "write modes need a cache (add cache=DIR to its options)");
  return *exp.control;
}

// Turns an ExportControl outcome into a result or a "refused"/"failed" error.
Json outcome(const ControlResult& r, const std::string& what) {
  if (r.ok()) {
    Json out = Json::object();
    if (!r.message.empty()) out["message"] = r.message;
    return out;
  }
  const int e = r.ec.value();
  const bool refused = e == EBUSY || e == EALREADY || e == EPERM || e == EINVAL || e == EAGAIN ||
                       e == EOPNOTSUPP || e == ENOSPC;
  throw ControlError(refused ? "refused" : "failed", e,
                     what + ": " + (r.message.empty() ? r.ec.message() : r.message));
}

Json prefetch_json(const PrefetchStatus& p) {
  Json j;
  j["state"] = std::string(to_string(p.state));
  j["order"] = std::string(to_string(p.order));
  j["total_bytes"] = p.total_bytes;
  j["done_bytes"] = p.done_bytes;
  j["percent"] = p.total_bytes ? 100.0 * static_cast<double>(p.done_bytes) / static_cast<double>(p.total_bytes)
                               : (p.state == PrefetchState::done ? 100.0 : 0.0);
  j["rate_limit"] = p.rate_limit;
  j["rate"] = std::isfinite(p.rate) ? p.rate : 0.0;
  j["eta_seconds"] = std::isfinite(p.eta_seconds) ? p.eta_seconds : -1.0;
  if (!p.error.empty()) j["error"] = p.error;
  return j;
}

Json qos_class_json(const core::QosClassStats& c, uint64_t iops, uint64_t bps) {
  return {{"iops", iops},       {"bps", bps},
          {"delayed", c.delayed}, {"delay_seconds", c.delay_seconds},
          {"queued", c.queued}};
}

// The limits (0 = none) and the throttling counters of an export.
Json qos_json(const core::QosStats& s) {
  Json j;
  j["limited"] = s.limits.any();
  j["burst"] = static_cast<double>(s.limits.burst.count()) / 1000.0;
  j["read"] = qos_class_json(s.read, s.limits.read_iops, s.limits.read_bps);
  j["write"] = qos_class_json(s.write, s.limits.write_iops, s.limits.write_bps);
  return j;
}

// A whole number from 0 to max, given as a JSON number or a string.
uint64_t arg_count(const Json& request, const char* key, uint64_t max) {
  auto it = request.find(key);
  const std::string what = std::string("argument \"") + key + "\"";
  if (it->is_number_unsigned() && it->get<uint64_t>() <= max) return it->get<uint64_t>();
  if (it->is_string()) {
    try {
      return core::parse_number(it->get<std::string>(), what, 0, max);
    } catch (const ConfigError& e) {
      bad_request(e.what());
    }
  }
  bad_request(what + " must be a number from 0 to " + std::to_string(max));
}

}  // namespace

void ControlDispatcher::add(std::string name, std::string summary, Handler handler) {
  table_[std::move(name)] = Entry{std::move(summary), std::move(handler)};
}

std::map<std::string, std::string> ControlDispatcher::commands() const {
  std::map<std::string, std::string> out;
  for (const auto& [name, e] : table_) out[name] = e.summary;
  return out;
}

std::string ControlDispatcher::error_line(const std::string& code, int errno_value, const std::string& message,
                                          const Json& id) {
  Json r;
  r["ok"] = false;
  r["error"] = {{"code", code}, {"errno", errno_value}, {"message", message}};
  if (!id.is_null()) r["id"] = id;
  // Replace invalid UTF-8 (a message may quote the client's bytes) rather than throw.
  return r.dump(-1, ' ', false, Json::error_handler_t::replace);
}

// Parsing is iterative, but copying and dumping a json value recurse: a
// request nested 30,000 deep would overflow the event loop's stack.
size_t json_depth(std::string_view text) {
  size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char ch : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (ch == '\\') escaped = true;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((ch == ']' || ch == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

Task<std::string> ControlDispatcher::handle(std::string_view line) const {
  if (line.size() > kMaxControlRequest)
    co_return error_line("too-large", E2BIG,
                         "request is larger than " + std::to_string(kMaxControlRequest) + " bytes");
  if (json_depth(line) > kMaxControlDepth)
    co_return error_line("bad-request", EINVAL,
                         "request nests deeper than " + std::to_string(kMaxControlDepth) + " levels");
  Json request = Json::parse(line.begin(), line.end(), nullptr, false);
  if (request.is_discarded())
    co_return error_line("bad-request", EINVAL, "malformed JSON: a request is one JSON object per line");
  if (!request.is_object())
    co_return error_line("bad-request", EINVAL, "a request must be a JSON object with a \"cmd\" string");
  Json id = request.contains("id") ? request["id"] : Json(nullptr);
  auto cmd_it = request.find("cmd");
  if (cmd_it == request.end() || !cmd_it->is_string())
    co_return error_line("bad-request", EINVAL, "missing \"cmd\" (a string naming the command)", id);
  const auto& cmd = cmd_it->get_ref<const std::string&>();
  auto it = table_.find(cmd);
  if (it == table_.end())
    co_return error_line("unknown-command", ENOSYS,
                         "unknown command '" + cmd + "' (the \"commands\" command lists them)", id);
  std::string error_code, error_message;
  int error_errno = 0;
  Json result;
  try {
    auto task = it->second.handler(request);
    result = co_await std::move(task);
  } catch (const ControlError& e) {
    error_code = e.code;
    error_errno = e.errno_value;
    error_message = e.what();
  } catch (const Json::exception& e) {
    error_code = "bad-request";
    error_errno = EINVAL;
    error_message = std::string("invalid argument: ") + e.what();
  } catch (const ConfigError& e) {
    error_code = "bad-request";
    error_errno = EINVAL;
    error_message = e.what();
  } catch (const std::exception& e) {
    error_code = "failed";
    error_errno = EIO;
    error_message = e.what();
  }
  if (!error_code.empty()) co_return error_line(error_code, error_errno, error_message, id);
  Json response;
  response["ok"] = true;
  response["result"] = std::move(result);
  if (!id.is_null()) response["id"] = id;
  co_return response.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string arg_string(const Json& request, const char* key) {
  auto it = request.find(key);
  if (it == request.end()) bad_request(std::string("missing argument \"") + key + "\"");
  if (!it->is_string()) bad_request(std::string("argument \"") + key + "\" must be a string");
  return it->get<std::string>();
}

std::string arg_absolute_path(const Json& request, const char* key) {
  auto path = arg_string(request, key);
  if (path.empty() || path[0] != '/')
    bad_request(std::string("argument \"") + key + "\" must be an absolute path (got '" + path + "')");
  return path;
}

bool arg_bool(const Json& request, const char* key, bool fallback) {
  auto it = request.find(key);
  if (it == request.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) bad_request(std::string("argument \"") + key + "\" must be true or false");
  return it->get<bool>();
}

uint64_t arg_size(const Json& request, const char* key) {
  auto it = request.find(key);
  if (it == request.end()) bad_request(std::string("missing argument \"") + key + "\"");
  if (it->is_number_unsigned()) return it->get<uint64_t>();
  if (it->is_number_integer()) {
    if (it->get<int64_t>() < 0) bad_request(std::string("argument \"") + key + "\" must not be negative");
    return static_cast<uint64_t>(it->get<int64_t>());
  }
  if (it->is_string()) {
    try {
      return parse_size(it->get<std::string>(), std::string("argument \"") + key + "\"");
    } catch (const ConfigError& e) {
      bad_request(e.what());
    }
  }
  bad_request(std::string("argument \"") + key + "\" must be a byte count (4096 or \"50M\")");
}

long export_clients(const std::shared_ptr<Export>& exp) {
  return std::max(0L, exp->clients.load(std::memory_order_relaxed));
}

Json export_json(const Export& exp, long clients) {
  Json j;
  j["name"] = exp.name;
  j["uri"] = remote::redact_uri(exp.uri);
  j["state"] = "open";
  if (!exp.description.empty()) j["description"] = exp.description;
  j["backend"] = exp.device->describe();
  j["size"] = exp.device->geometry().size;
  j["read_only"] = exp.device->capabilities().read_only;
  if (clients >= 0) j["clients"] = clients;
  // allow= / listen= and the NBD clients they refused.
  Json access;
  const auto policy = exp.access.load();
  access["allow"] = policy ? policy->allow_text() : "";
  access["listen"] = policy ? policy->listen_text() : "";
  access["tls_required"] = exp.tls_required;
  access["denied"] = exp.denied.load(std::memory_order_relaxed);
  // fuse-uid=, fuse-gid=, fuse-mode= (null: the mount's).
  const auto file = exp.file();
  access["fuse_uid"] = file.uid ? Json(*file.uid) : Json(nullptr);
  access["fuse_gid"] = file.gid ? Json(*file.gid) : Json(nullptr);
  access["fuse_mode"] = file.mode ? Json(fmt::format("{:04o}", *file.mode)) : Json(nullptr);
  j["access"] = std::move(access);

  Json remote;
  if (exp.remote_health) {
    const auto h = exp.remote_health();
    remote["kind"] = "network";
    remote["connected"] = h.connected;
    remote["generation"] = h.generation;
    remote["reconnects"] = h.reconnects;
    remote["retries"] = h.retries;
    remote["failures"] = h.failures;
    if (h.last_error) remote["last_error"] = h.last_error.message();
    if (!h.detail.empty()) remote["health"] = h.detail;
  } else {
    remote["kind"] = "local";
    remote["connected"] = true;  // a local file cannot be disconnected
  }

  if (exp.control) {
    const auto r = exp.control->report();
    j["mode"] = r.mode;
    j["present_bytes"] = r.present_bytes;
    j["dirty_bytes"] = r.dirty_bytes;
    Json cache;
    cache["mode"] = r.mode;
    cache["detached"] = r.detached;
    cache["path"] = r.cache_path;
    cache["chunk_size"] = r.chunk_size;
    cache["capacity"] = r.capacity;
    cache["present_bytes"] = r.present_bytes;
    cache["dirty_bytes"] = r.dirty_bytes;
    cache["hits"] = r.hits;
    cache["misses"] = r.misses;
    cache["bytes_fetched"] = r.bytes_fetched;
    cache["bytes_written_back"] = r.bytes_written_back;
    cache["fetch_errors"] = r.fetch_errors;
    cache["writeback_errors"] = r.writeback_errors;
    cache["evicted_bytes"] = r.evicted_bytes;
    cache["evictions"] = r.evictions;
    cache["file_bytes"] = r.file_bytes;
    cache["failed_requests"] = r.failed_requests;
    cache["lost_write_reports"] = r.lost_write_reports;
    cache["replayed_chunks"] = r.replayed_chunks;
    cache["recovered"] = r.recovered;
    j["cache"] = std::move(cache);
    j["prefetch"] = prefetch_json(r.prefetch);
    if (r.detached) {
      remote["kind"] = "detached";
      remote["connected"] = false;
    }
  } else {
    j["mode"] = "direct";  // no cache: every request goes to the remote
    j["present_bytes"] = nullptr;
    j["dirty_bytes"] = nullptr;
    j["cache"] = nullptr;
    j["prefetch"] = nullptr;
  }
  if (exp.qos) j["qos"] = qos_json(exp.qos->stats());
  if (exp.overlay_counters) {
    // A clone: what it owns, and what it reads through its base's shared cache.
    remote["kind"] = "clone";
    remote["connected"] = true;
    Json overlay{{"base", exp.clone_of}, {"path", exp.overlay_path}};
    Json flatten = Json::object();
    for (const auto& [key, value] : exp.overlay_counters()) {
      if (key.rfind("flatten_", 0) == 0)
        flatten[key.substr(8)] = value;
      else
        overlay[key] = value;
    }
    overlay["recovered"] = overlay["recovered"] == 1;
    if (flatten.contains("state")) {
      flatten["state"] = core::flatten_state_name(static_cast<core::FlattenState>(flatten["state"].get<uint64_t>()));
      overlay["flatten"] = std::move(flatten);
    }
    j["clone"] = std::move(overlay);
    j["mode"] = "clone";
  }
  if (!exp.snapshot_of.empty()) {
    // A snapshot's read-only view (CLONE@SNAPSHOT).
    remote["kind"] = "snapshot";
    remote["connected"] = true;
    j["snapshot_of"] = exp.snapshot_of;
    j["mode"] = "snapshot";
  }
  j["remote"] = std::move(remote);
  j["base_of_clones"] = exp.device->read_only_holds();

  const auto s = exp.device->stats().snapshot();
  j["io"] = {{"reads", s.reads},           {"bytes_read", s.bytes_read}, {"writes", s.writes},
             {"bytes_written", s.bytes_written}, {"flushes", s.flushes}, {"trims", s.trims},
             {"zeroes", s.zeroes},         {"block_status", s.block_status},
             {"prefetches", s.prefetches}, {"errors", s.errors}};
  return j;
}

namespace {

// The handlers of add_export_commands. Plain functions returning a Task (no
// capturing coroutine lambdas: the GCC 12 rule in HELPERS.md).
class ExportCommands {
 public:
  ExportCommands(ExportTable& exports, ExportCommandHooks hooks) : exports_(exports), hooks_(std::move(hooks)) {}

  Task<Json> status(const Json&) {
    Json list = Json::array();
    for (const auto& exp : exports_.list()) list.push_back(export_json(*exp, export_clients(exp)));
    add_failed(list);
    Json out;
    out["exports"] = std::move(list);
    out["pid"] = static_cast<long>(::getpid());
    if (hooks_.remote_bandwidth) out["remote_bandwidth"] = hooks_.remote_bandwidth();
    out["version"] = BLOCKWAY_VERSION;
    co_return out;
  }

  Task<Json> list(const Json&) {
    Json list = Json::array();
    for (const auto& exp : exports_.list()) {
      Json e;
      e["name"] = exp->name;
      e["uri"] = remote::redact_uri(exp->uri);
      e["size"] = exp->device->geometry().size;
      e["read_only"] = exp->device->capabilities().read_only;
      e["mode"] = exp->control ? exp->control->report().mode : std::string("direct");
      e["clients"] = export_clients(exp);
      e["state"] = "open";
      list.push_back(std::move(e));
    }
    add_failed(list);
    co_return Json{{"exports", std::move(list)}};
  }

  Task<Json> stats(const Json& req) {
    if (auto failed = failed_entry(hooks_, arg_string(req, "name")); !failed.is_null()) co_return failed;
    auto exp = find_export(exports_, req, hooks_);
    co_return export_json(*exp, export_clients(exp));
  }

  Task<Json> flush(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    if (exp->device->capabilities().read_only) co_return Json{{"message", "read-only export: nothing to flush"}};
    const std::error_code ec = co_await exp->device->flush();
    if (ec) throw ControlError("failed", ec.value(), "flush of '" + exp->name + "' failed: " + ec.message());
    co_return Json::object();
  }

  Task<Json> prefetch_start(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    auto order = PrefetchOrder::sequential;
    if (req.contains("order")) {
      const auto o = arg_string(req, "order");
      if (o == "hot-first") order = PrefetchOrder::hot_first;
      else if (o != "sequential") bad_request("order must be \"sequential\" or \"hot-first\", not '" + o + "'");
    }
    auto& c = control_of(*exp);
    co_return outcome(c.prefetch_start(order), "prefetch start '" + exp->name + "'");
  }
  Task<Json> prefetch_pause(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    co_return outcome(control_of(*exp).prefetch_pause(), "prefetch pause '" + exp->name + "'");
  }
  Task<Json> prefetch_resume(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    co_return outcome(control_of(*exp).prefetch_resume(), "prefetch resume '" + exp->name + "'");
  }
  Task<Json> prefetch_rate(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    const uint64_t rate = arg_size(req, "rate");
    auto ordered = settings_lock(exp->name, "prefetch-rate");
    auto guard = co_await ordered->lock();
    Json out = outcome(control_of(*exp).prefetch_set_rate(rate), "prefetch rate '" + exp->name + "'");
    auto saving = persist(exp, "prefetch-rate", std::to_string(rate), out);
    co_await std::move(saving);
    co_return out;
  }
  Task<Json> prefetch_status(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    const auto r = control_of(*exp).report();
    Json out = prefetch_json(r.prefetch);
    out["name"] = exp->name;
    out["present_bytes"] = r.present_bytes;
    out["dirty_bytes"] = r.dirty_bytes;
    out["size"] = exp->device->geometry().size;
    out["mode"] = r.mode;
    out["detached"] = r.detached;
    co_return out;
  }

  Task<Json> detach(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    const bool force = arg_bool(req, "force", false);
    auto& c = control_of(*exp);
    const ControlResult r = co_await c.detach(force);
    co_return outcome(r, "detach '" + exp->name + "'");
  }

  Task<Json> mode(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    const auto m = arg_string(req, "mode");
    if (m != "writethrough" && m != "writeback" && m != "writeback-local")
      bad_request("mode must be writethrough, writeback or writeback-local, not '" + m +
                  "' (use detach for local)");
    auto& c = control_of(*exp);
    auto ordered = settings_lock(exp->name, "mode");
    auto guard = co_await ordered->lock();
    const ControlResult r = co_await c.set_mode(m);
    Json out = outcome(r, "mode '" + exp->name + "'");
    auto saving = persist(exp, "mode", m, out);
    co_await std::move(saving);
    co_return out;
  }

  // qos {name, read_iops?, write_iops?, read_bps?, write_bps?, burst?, off?}:
  // changes the given limits (the others stay), or lifts them all with off;
  // with none of those it only reports. Saved like the write mode.
  Task<Json> qos(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    if (!exp->qos) throw ControlError("refused", EOPNOTSUPP, "export '" + exp->name + "' has no QoS layer");
    const bool off = arg_bool(req, "off", false);
    static constexpr const char* kKeys[] = {"read_iops", "write_iops", "read_bps", "write_bps", "burst"};
    const bool change = std::any_of(std::begin(kKeys), std::end(kKeys), [&](const char* k) { return req.contains(k); });
    if (off && change) bad_request("off lifts every limit: give it alone, or give the limits to set");
    if (!off && !change) {
      Json out = qos_json(exp->qos->stats());
      out["name"] = exp->name;
      co_return out;
    }
    auto ordered = settings_lock(exp->name, "qos");
    auto guard = co_await ordered->lock();
    core::QosLimits q = off ? core::QosLimits{} : exp->qos->limits();
    if (off) q.burst = exp->qos->limits().burst;
    constexpr uint64_t kMaxIops = 4294967295;
    if (req.contains("read_iops")) q.read_iops = arg_count(req, "read_iops", kMaxIops);
    if (req.contains("write_iops")) q.write_iops = arg_count(req, "write_iops", kMaxIops);
    if (req.contains("read_bps")) q.read_bps = arg_size(req, "read_bps");
    if (req.contains("write_bps")) q.write_bps = arg_size(req, "write_bps");
    if (req.contains("burst")) {
      const auto& b = req["burst"];
      const std::string text = b.is_string() ? b.get<std::string>() : b.is_number() ? b.dump() : std::string("?");
      try {
        q.burst = core::parse_seconds(text, "argument \"burst\"", 0.01, 3600);
      } catch (const ConfigError& e) {
        bad_request(e.what());
      }
    }
    exp->qos->set_limits(q);
    Json out = qos_json(exp->qos->stats());
    out["name"] = exp->name;
    auto saving = persist(exp, "qos", q.to_options(), out);
    co_await std::move(saving);
    co_return out;
  }

  // access {name, allow?, listen?, fuse_uid?, fuse_gid?, fuse_mode?}:
  // replaces the export's allow= and/or listen= rules (an empty string lifts
  // them) and/or the owner, group and mode of its FUSE file (an empty string:
  // the mount's); without any, reports. Sessions already open keep going;
  // every later handshake sees the new rules, the FUSE file its new
  // attributes at once. Saved like the QoS limits.
  Task<Json> access(const Json& req) {
    auto exp = find_export(exports_, req, hooks_);
    const auto report = [&] {
      Json out = export_json(*exp, -1)["access"];
      out["name"] = exp->name;
      add_fuse_file(*exp, out);
      return out;
    };
    const bool fuse_change = req.contains("fuse_uid") || req.contains("fuse_gid") || req.contains("fuse_mode");
    const bool rules_change = req.contains("allow") || req.contains("listen");
    if (!fuse_change && !rules_change) co_return report();
    if (rules_change && !exp->snapshot_of.empty())
      throw ControlError("refused", EPERM,
                         "export '" + exp->name + "' is a snapshot of clone '" + exp->snapshot_of +
                             "': it takes the clone's allow= and listen= rules (change them on '" + exp->snapshot_of +
                             "')");
    // Parsed before anything changes: a bad value changes nothing.
    std::optional<FilePatch> patch;
    if (fuse_change) patch = file_patch(*exp, req);
    Json saves = Json::object();  // what persist() warns of
    if (rules_change) {
      auto changing = change_rules(exp, req, saves);
      co_await std::move(changing);
    }
    if (patch) {
      auto changing = change_file(exp, *patch, saves);
      co_await std::move(changing);
    }
    // Files hidden from some users now, or shown, or with a new owner or
    // mode: the kernel forgets what it cached of them before the answer, so
    // that a stat right after it sees them as they are.
    auto forgetting = forget_file(exp);
    co_await std::move(forgetting);
    Json out = report();
    if (patch && out.contains("fuse") && out["fuse"]["mountpoint"] == "")
      out["message"] = "no FUSE mount now: the file gets these when one is made (blockway mount DIR)";
    if (saves.contains("warning")) {
      const std::string message = out.value("message", "");
      out["message"] = message + (message.empty() ? "" : "; ") + saves.value("message", "");
      out["warning"] = saves["warning"];
    }
    co_return out;
  }

 private:
  // The fuse_uid, fuse_gid and fuse_mode of a request: which are given, and
  // their values (an empty string: unset, the mount's).
  struct FilePatch {
    bool uid = false, gid = false, mode = false;
    core::FileAttrs values;
    [[nodiscard]] core::FileAttrs over(core::FileAttrs attrs) const {
      if (uid) attrs.uid = values.uid;
      if (gid) attrs.gid = values.gid;
      if (mode) attrs.mode = values.mode;
      return attrs;
    }
  };
  // Bad-request with the configuration's message for a bad value.
  static FilePatch file_patch(const Export& exp, const Json& req) {
    if (!exp.snapshot_of.empty())
      throw ControlError("refused", EPERM,
                         "export '" + exp.name + "' is a snapshot of clone '" + exp.snapshot_of +
                             "': its FUSE file takes the clone's owner and mode (change them on '" + exp.snapshot_of +
                             "')");
    FilePatch patch;
    try {
      if ((patch.uid = req.contains("fuse_uid")))
        if (const auto v = arg_string(req, "fuse_uid"); !v.empty()) patch.values.uid = parse_fuse_uid(exp.name, v);
      if ((patch.gid = req.contains("fuse_gid")))
        if (const auto v = arg_string(req, "fuse_gid"); !v.empty()) patch.values.gid = parse_fuse_gid(exp.name, v);
      if ((patch.mode = req.contains("fuse_mode")))
        if (const auto v = arg_string(req, "fuse_mode"); !v.empty())
          patch.values.mode = parse_fuse_mode(exp.name, v);
    } catch (const ConfigError& e) {
      bad_request(e.what());
    }
    return patch;
  }

  // What the export's FUSE file shows now, and where the mount is: "fuse":
  // {mountpoint ("" when none), uid, gid, mode}.
  void add_fuse_file(const Export& exp, Json& out) const {
    if (!hooks_.fuse_mount) return;
    const auto mount = hooks_.fuse_mount();
    const auto file =
        exp.file().resolve(mount.uid, mount.gid, mount.mode, exp.device->capabilities().read_only);
    out["fuse"] = {{"mountpoint", mount.mountpoint},
                   {"uid", file.uid},
                   {"gid", file.gid},
                   {"mode", fmt::format("{:04o}", file.mode)}};
  }

  Task<void> forget_file(std::shared_ptr<Export> exp) {
    if (!hooks_.forget_file) co_return;
    auto forgetting = hooks_.forget_file(std::move(exp));
    co_await std::move(forgetting);
  }

  // allow=/listen= of an access request, for the export and its snapshots'
  // (CLONE@SNAP serves under the clone's rules).
  Task<void> change_rules(std::shared_ptr<Export> exp, const Json& req, Json& saves) {
    auto ordered = settings_lock(exp->name, "access");
    auto guard = co_await ordered->lock();
    const auto old = exp->access.load();
    const std::string allow = req.contains("allow") ? arg_string(req, "allow") : old ? old->allow_text() : "";
    const std::string listen = req.contains("listen") ? arg_string(req, "listen") : old ? old->listen_text() : "";
    core::AccessPolicy policy;
    try {
      policy = core::AccessPolicy::parse(allow, listen);
    } catch (const ConfigError& e) {
      bad_request(e.what());
    }
    const std::string saved = policy.saved();
    exp->access.store(policy.open() ? nullptr : std::make_shared<const core::AccessPolicy>(std::move(policy)));
    for (const auto& view : exports_.list())
      if (view->snapshot_of == exp->name) view->access.store(exp->access.load());
    core::logger("control")->info("export '{}': access rules now allow '{}', listen '{}'", exp->name, allow, listen);
    auto saving = persist(exp, "access", saved, saves);
    co_await std::move(saving);
  }

  // The owner, group and mode of the export's FUSE file, and of its
  // snapshots' (CLONE@SNAP shows its file as the clone's).
  Task<void> change_file(std::shared_ptr<Export> exp, FilePatch patch, Json& saves) {
    auto ordered = settings_lock(exp->name, "fuse");
    auto guard = co_await ordered->lock();
    const auto attrs = patch.over(exp->file());
    exp->file_attrs.store(attrs == core::FileAttrs{} ? nullptr : std::make_shared<const core::FileAttrs>(attrs));
    for (const auto& view : exports_.list()) {
      if (view->snapshot_of != exp->name) continue;
      view->file_attrs.store(exp->file_attrs.load());
      auto forgetting = forget_file(view);
      co_await std::move(forgetting);
    }
    const std::string saved = saved_fuse_attrs(attrs);
    core::logger("control")->info("export '{}': FUSE file now {}", exp->name, saved);
    auto saving = persist(exp, "fuse", saved, saves);
    co_await std::move(saving);
  }

  // The lock that orders the changes of one run-time setting (mode,
  // prefetch-rate) of one export: each command holds it from the change until
  // the change is saved, so the saved value is the one in effect (two
  // concurrent mode commands cannot be saved in the opposite order from the
  // one in which they switched). Keyed by name, like the saved settings.
  std::shared_ptr<AsyncMutex> settings_lock(const std::string& name, const std::string& key) {
    std::lock_guard lock(settings_locks_mutex_);
    auto& slot = settings_locks_[name + '\0' + key];
    if (!slot) slot = std::make_shared<AsyncMutex>();
    return slot;
  }

  // Saves a change the export took, so that it outlives a restart; a failure
  // to save is a warning in the reply (the change itself is in effect).
  Task<void> persist(std::shared_ptr<Export> exp, std::string key, std::string value, Json& out) {
    if (!hooks_.persist) co_return;
    auto saving = hooks_.persist(std::move(exp), std::move(key), std::move(value));
    const std::string warning = co_await std::move(saving);
    if (warning.empty()) co_return;
    std::string message = out.value("message", "");
    out["message"] = message + (message.empty() ? "" : "; ") + "warning: " + warning;
    out["warning"] = warning;
  }

  void add_failed(Json& list) const {
    if (!hooks_.failed_exports) return;
    for (auto& e : hooks_.failed_exports()) list.push_back(std::move(e));
  }

  ExportTable& exports_;
  ExportCommandHooks hooks_;
  std::mutex settings_locks_mutex_;
  std::map<std::string, std::shared_ptr<AsyncMutex>> settings_locks_;
};

Task<Json> list_commands(const ControlDispatcher& d) {
  Json out = Json::object();
  for (const auto& [name, summary] : d.commands()) out[name] = summary;
  co_return out;
}

}  // namespace

void add_export_commands(ControlDispatcher& d, ExportTable& exports, ExportCommandHooks hooks) {
  auto cmds = std::make_shared<ExportCommands>(exports, std::move(hooks));
  auto bind = [cmds](Task<Json> (ExportCommands::*fn)(const Json&)) -> ControlDispatcher::Handler {
    return [cmds, fn](const Json& req) { return ((*cmds).*fn)(req); };
  };
  d.add("status", "every export with its state and counters", bind(&ExportCommands::status));
  d.add("list", "export names, URIs, sizes and modes", bind(&ExportCommands::list));
  d.add("stats", "one export's state and counters {name}", bind(&ExportCommands::stats));
  d.add("flush", "flush an export to stable storage {name}", bind(&ExportCommands::flush));
  d.add("prefetch-start", "start copying the image into the cache {name, order?}",
        bind(&ExportCommands::prefetch_start));
  d.add("prefetch-pause", "pause the prefetch {name}", bind(&ExportCommands::prefetch_pause));
  d.add("prefetch-resume", "resume the prefetch {name}", bind(&ExportCommands::prefetch_resume));
  d.add("prefetch-rate", "limit the prefetch to bytes per second, 0 = unlimited {name, rate}",
        bind(&ExportCommands::prefetch_rate));
  d.add("prefetch-status", "prefetch progress {name}", bind(&ExportCommands::prefetch_status));
  d.add("detach", "switch to local-only operation {name, force?}", bind(&ExportCommands::detach));
  d.add("mode", "change the cache's write mode {name, mode}", bind(&ExportCommands::mode));
  d.add("access", "show or change who may use an export over NBD {name, allow?, listen?}",
        bind(&ExportCommands::access));
  d.add("qos", "show or change an export's QoS limits {name, read_iops?, write_iops?, read_bps?, write_bps?, "
        "burst?, off?}", bind(&ExportCommands::qos));
  // "commands" lists the table as it is when asked, including later additions.
  d.add("commands", "the commands this daemon understands",
        [&d](const Json&) { return list_commands(d); });
}

}  // namespace blockway::gateway
