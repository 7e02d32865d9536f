// blockway status: every export of the running daemon, one line each.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <cstdio>

namespace blockway::cli {

int status_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway status [--json] [--socket PATH]\n\n"
               "Every export of the running daemon: mode, size, cached and dirty bytes,\n"
               "prefetch progress, remote health and connected clients."};
  command.request = [](const Args&) { return Request("status", Json::object()); };
  command.print = [](const Args&, const Json& r) {
    const auto& list = r.at("exports");
    if (list.empty()) {
      std::puts("no exports");
      return;
    }
    fmt::print("{:<16} {:<15} {:>10} {:>10} {:>10} {:<10} {:>7}  {}\n", "NAME", "MODE", "SIZE", "PRESENT", "DIRTY",
               "REMOTE", "CLIENTS", "PREFETCH");
    for (const auto& e : list) {
      if (failed_export(e)) {
        fmt::print("{:<16} {}\n", str(e, "name"), str(e, "state"));
        continue;
      }
      std::string mode = str(e, "mode");
      if (e.value("read_only", false)) mode += ",ro";
      fmt::print("{:<16} {:<15} {:>10} {:>10} {:>10} {:<10} {:>7}  {}\n", str(e, "name"), mode, bytes(u64(e, "size")),
                 e["present_bytes"].is_number() ? bytes(u64(e, "present_bytes")) : "-",
                 e["dirty_bytes"].is_number() ? bytes(u64(e, "dirty_bytes")) : "-", remote_summary(e["remote"]),
                 u64(e, "clients"), prefetch_summary(e["prefetch"]));
    }
    if (r.contains("remote_bandwidth")) {
      const auto& b = r["remote_bandwidth"];
      fmt::print("remote bandwidth cap {}/s:", bytes(u64(b, "rate")));
      for (const char* c : {"client", "prefetch"})
        fmt::print(" {} {} ({} delayed, {} waiting){}", c, bytes(u64(b[c], "bytes")), u64(b[c], "delayed"),
                   u64(b[c], "queued"), c[0] == 'c' ? ";" : "\n");
    }
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
