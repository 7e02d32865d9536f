// Control protocol: newline-delimited JSON requests and responses, and the
// dispatch table that maps a command name to its handler.
//
// A request is one JSON object on one line: {"cmd": "stats", "name": "vm1"}
// (an optional "id" of any type is echoed back). A response is one line:
//   {"ok": true,  "result": {...}}
//   {"ok": false, "error": {"code": "unknown-export", "errno": 2, "message": "..."}}
// Error codes: bad-request (malformed JSON, missing or wrong-typed argument),
// too-large, unknown-command, unknown-export, no-cache (the export has no
// cache to control), refused (the action is not possible now: EBUSY,
// EALREADY, EPERM...), failed (it was tried and did not work).
//
// Thread model: a ControlDispatcher is filled before the control server
// starts and read-only afterwards; handle() may run on any event loop and
// many times at once. Handlers signal errors by throwing ControlError (this is
// the control path, not the data path); anything else thrown becomes a
// "failed" response, never a crash.
#pragma once

#include "core/export.hpp"
#include "core/task.hpp"

#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>

namespace blockway::gateway {

using Json = nlohmann::json;

// The largest request line the server reads; longer ones are answered with
// "too-large" and the connection is closed.
inline constexpr size_t kMaxControlRequest = 64 * 1024;
// The deepest nesting of arrays and objects a request may have.
inline constexpr size_t kMaxControlDepth = 32;

struct ControlError : std::runtime_error {
  ControlError(std::string code_, int errno_value_, const std::string& message)
      : std::runtime_error(message), code(std::move(code_)), errno_value(errno_value_) {}
  std::string code;
  int errno_value;
};

class ControlDispatcher {
 public:
  // Runs on an event loop; returns the "result" object or throws ControlError.
  using Handler = std::function<core::Task<Json>(const Json& request)>;

  // Adds a command; a later add() with the same name replaces it.
  void add(std::string name, std::string summary, Handler handler);
  // Parses one request line and runs its command. Always returns a complete
  // response line (without the trailing newline).
  core::Task<std::string> handle(std::string_view line) const;

  [[nodiscard]] std::map<std::string, std::string> commands() const;

  [[nodiscard]] static std::string error_line(const std::string& code, int errno_value,
                                              const std::string& message, const Json& id = nullptr);

 private:
  struct Entry {
    std::string summary;
    Handler handler;
  };
  std::map<std::string, Entry, std::less<>> table_;
};

// Deepest nesting of arrays and objects in a JSON text (strings skipped):
// checked before parsing text from outside (a request, a profile file).
size_t json_depth(std::string_view text);

// Argument helpers: throw ControlError("bad-request") naming the argument.
std::string arg_string(const Json& request, const char* key);
// A path on the daemon's host: absolute, since the daemon's working directory
// is not the caller's.
std::string arg_absolute_path(const Json& request, const char* key);
bool arg_bool(const Json& request, const char* key, bool fallback);
// A byte count: a non-negative integer, or a string with a binary suffix ("50M").
uint64_t arg_size(const Json& request, const char* key);

// The state of one export as the control plane reports it. `clients` is the
// number of NBD connections using it (-1 if unknown).
Json export_json(const core::Export& exp, long clients);

// NBD connections using an export (Export::clients).
long export_clients(const std::shared_ptr<core::Export>& exp);

// What the daemon adds to the export commands; each may be empty.
struct ExportCommandHooks {
  // Saves a run-time change that should outlive a restart: key "mode",
  // "prefetch-rate" (bytes per second), "qos", "access" or "fuse" (the
  // saved_fuse_attrs() form) of export `exp`, after the export
  // took it. Returns "" once saved, else a warning for the reply. Runs on the
  // control plane's event loop (offload what blocks), with the lock of that
  // export's setting held: changes of one setting are saved one at a time, in
  // the order in which they took effect.
  // Saved only while `exp` itself is still in the table: not after it was
  // removed, nor onto a new export added under its name meanwhile.
  std::function<core::Task<std::string>(std::shared_ptr<core::Export> exp, std::string key, std::string value)>
      persist;
  // Exports saved in the catalogue that could not be opened at start: each
  // {name, uri, options, state: "failed: REASON", error: REASON}. status and
  // list show them, stats NAME shows one, other commands are refused.
  std::function<Json()> failed_exports;
  // The daemon-wide remote bandwidth cap and its counters, for status; unset
  // without a cap.
  std::function<Json()> remote_bandwidth;
  // The FUSE mount's owner, group and mode for files whose export sets none,
  // and where it is mounted now ("" when not), for access's report of an
  // export's file; unset: no such report.
  struct FuseMount {
    std::string mountpoint;
    uid_t uid = 0;
    gid_t gid = 0;
    mode_t mode = 0;
  };
  std::function<FuseMount()> fuse_mount;
  // The export's FUSE file has a new owner, mode or allow= rules: has the
  // kernel forget what it cached of it (FuseFrontEnd::forget, on the
  // blocking pool); done when the task is.
  std::function<core::Task<void>(std::shared_ptr<core::Export>)> forget_file;
};

// Registers the commands that need only the export table: status, list,
// stats, flush, prefetch-start|pause|resume|rate|status, detach, mode,
// commands. The daemon adds export-add and export-remove.
void add_export_commands(ControlDispatcher& dispatcher, core::ExportTable& exports, ExportCommandHooks hooks = {});

}  // namespace blockway::gateway
