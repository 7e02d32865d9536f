// blockway access NAME [--allow RULES] [--listen NAMES] [--fuse-uid USER]
// [--fuse-gid GROUP] [--fuse-mode MODE]: show or change who may use an
// export over NBD and who may open its file in the FUSE mount.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <cstdio>

namespace blockway::cli {

namespace {

// "64131", or "the mount's" for null.
std::string own_or_mount(const Json& r, const char* key) {
  const auto it = r.find(key);
  if (it == r.end() || it->is_null()) return "the mount's";
  return it->is_string() ? it->get<std::string>() : it->dump();
}

}  // namespace

int access_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway access NAME [--allow RULES] [--listen NAMES] [--fuse-uid USER]\n"
               "                        [--fuse-gid GROUP] [--fuse-mode MODE] [--json] [--socket PATH]\n\n"
               "Shows who may use an export over NBD and how many clients were refused, and\n"
               "the owner and mode of its file in the FUSE mount; or changes them.\n"
               "--allow takes addresses and CIDRs, cert:NAME, psk:NAME, user:NAME and\n"
               "group:NAME separated by spaces or ';' (\"\" lets everyone in); --listen the\n"
               "named listeners to publish it on (\"\" = all). Clients already connected stay;\n"
               "the next handshake sees the new rules.\n"
               "--fuse-uid and --fuse-gid take a user or group name or number, --fuse-mode\n"
               "octal permission bits up to 0777 (\"\" = the mount's uid=, gid=, mode=): the\n"
               "FUSE file shows them at once (read-only exports keep at most 0444), opens by\n"
               "users they no longer let in fail with EACCES; files already open stay open.\n"
               "A snapshot export (CLONE@SNAP) takes its clone's rules, owner and mode: change\n"
               "them on the clone.\n"
               "Kept across restarts while the configuration says what it said when they\n"
               "were set (a changed configuration value wins).",
      .positionals = 1,
      .options = {"--allow", "--listen", "--fuse-uid", "--fuse-gid", "--fuse-mode"},
      .argument_options = {{"fuse_uid", "--fuse-uid"}, {"fuse_gid", "--fuse-gid"}, {"fuse_mode", "--fuse-mode"}}};
  command.request = [](const Args& a) {
    Json req = {{"name", a.positional[0]}};
    for (const auto& [option, argument] :
         {std::pair{"--allow", "allow"}, std::pair{"--listen", "listen"}, std::pair{"--fuse-uid", "fuse_uid"},
          std::pair{"--fuse-gid", "fuse_gid"}, std::pair{"--fuse-mode", "fuse_mode"}})
      if (a.options.contains(option)) req[argument] = a.option(option);
    return Request("access", req);
  };
  command.print = [](const Args&, const Json& r) {
    const auto allow = str(r, "allow"), listen = str(r, "listen");
    fmt::print("export '{}': allow {}; listen {}; {}; {} client(s) refused\n", str(r, "name"),
               allow.empty() ? "everyone" : "'" + allow + "'", listen.empty() ? "on every listener" : "'" + listen + "'",
               r.value("tls_required", false) ? "TLS required" : "TLS as the server says", u64(r, "denied"));
    fmt::print("FUSE file: fuse-uid {}, fuse-gid {}, fuse-mode {}", own_or_mount(r, "fuse_uid"),
               own_or_mount(r, "fuse_gid"), own_or_mount(r, "fuse_mode"));
    if (const auto f = r.find("fuse"); f != r.end() && f->is_object()) {
      const auto where = str(*f, "mountpoint");
      fmt::print(" (shown as owner {}, group {}, mode {}{})", u64(*f, "uid"), u64(*f, "gid"), str(*f, "mode"),
                 where.empty() ? "" : " in " + where);
    }
    fmt::print("\n");
    if (r.contains("message")) fmt::print("{}\n", str(r, "message"));
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
