// blockway connect / disconnect / devices: exports as kernel block devices
// (/dev/nbdN), attached and served by the daemon.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <cstdio>

namespace blockway::cli {

namespace {

std::string device_line(const Json& d) {
  std::string line = str(d, "device", "?") + "  export '" + str(d, "export", "?") + "'  " +
                     std::to_string(d.value("size", uint64_t{0})) + " bytes, block " +
                     std::to_string(d.value("block_size", 0u)) + ", " + std::to_string(d.value("connections", 0u)) +
                     " connection(s)";
  if (d.value("read_only", false)) line += ", read-only";
  if (d.value("rotational", false)) line += ", rotational";
  if (const auto r = d.value("reconnects", 0u)) line += ", " + std::to_string(r) + " reconnect(s)";
  return line;
}

}  // namespace

int connect_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway connect NAME [/dev/nbdN] [--connections N] [--read-only] [--rotational]\n"
               "                        [--dead-conn-timeout SECONDS] [--timeout SECONDS] [--socket PATH]\n\n"
               "Attaches export NAME as a kernel block device (the nbd module, through netlink):\n"
               "the daemon serves it over socketpairs, one per connection (default: one per\n"
               "event loop if the export allows multi-conn, else 1). Without a device the\n"
               "kernel picks a free one. The device stays attached across daemon restarts:\n"
               "its I/O waits up to --dead-conn-timeout (default 120) for the next daemon;\n"
               "a request unanswered for --timeout seconds (default 5) is sent again on a\n"
               "new connection. Needs root (CAP_SYS_ADMIN) in the daemon.",
      .flags = {"--read-only", "--rotational"},
      .positionals = 1,
      .optional_positionals = 1,
      .options = {"--connections", "--dead-conn-timeout", "--timeout"}};
  command.request = [](const Args& a) {
    Json options = Json::object();
    if (a.positional.size() > 1) options["device"] = a.positional[1];
    if (a.has("--read-only")) options["read-only"] = "on";
    if (a.has("--rotational")) options["rotational"] = "on";
    for (const char* o : {"connections", "dead-conn-timeout", "timeout"}) {
      const std::string v = a.option(std::string("--") + o);
      if (!v.empty()) options[o] = v;
    }
    return Request("device-connect", {{"name", a.positional[0]}, {"options", options}});
  };
  command.print = [](const Args&, const Json& r) { std::printf("%s\n", device_line(r).c_str()); };
  return run_one_request(in, command);
}

int disconnect_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway disconnect /dev/nbdN [--force] [--socket PATH]\n\n"
               "Detaches a kernel device the daemon attached. Refused while the device is in\n"
               "use (mounted, or open exclusively): with --force it is detached anyway and its\n"
               "users get I/O errors.",
      .flags = {"--force"},
      .positionals = 1};
  command.request = [](const Args& a) {
    return Request("device-disconnect", {{"device", a.positional[0]}, {"force", a.has("--force")}});
  };
  command.print = [](const Args& a, const Json& r) {
    std::printf("%s disconnected (export '%s')\n", str(r, "device", a.positional[0]).c_str(),
                str(r, "export", "?").c_str());
  };
  return run_one_request(in, command);
}

int devices_command(const std::vector<std::string>& in) {
  OneRequest command{.usage = "Usage: blockway devices [--json] [--socket PATH]\n\n"
                              "Lists the kernel devices the daemon serves."};
  command.request = [](const Args&) { return Request("devices", Json::object()); };
  command.print = [](const Args&, const Json& r) {
    const auto& list = r.contains("devices") ? r["devices"] : Json::array();
    if (list.empty()) std::puts("no devices attached");
    for (const auto& d : list) std::printf("%s\n", device_line(d).c_str());
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
