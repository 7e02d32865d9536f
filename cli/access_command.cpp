// blockway access NAME [--allow RULES] [--listen NAMES]: show or change who
// may use an export over NBD.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

namespace blockway::cli {

int access_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway access NAME [--allow RULES] [--listen NAMES] [--json] [--socket PATH]\n\n"
               "Shows who may use an export over NBD and how many clients were refused, or\n"
               "replaces its rules: --allow takes addresses and CIDRs, cert:NAME, psk:NAME,\n"
               "user:NAME and group:NAME separated by spaces or ';' (\"\" lets everyone in);\n"
               "--listen the named listeners to publish it on (\"\" = all). Clients already\n"
               "connected stay; the next handshake sees the new rules. Kept across restarts.",
      .positionals = 1,
      .options = {"--allow", "--listen"}};
  command.request = [](const Args& a) {
    Json req = {{"name", a.positional[0]}};
    if (a.options.contains("--allow")) req["allow"] = a.option("--allow");
    if (a.options.contains("--listen")) req["listen"] = a.option("--listen");
    return Request("access", req);
  };
  command.print = [](const Args&, const Json& r) {
    const auto allow = str(r, "allow"), listen = str(r, "listen");
    fmt::print("export '{}': allow {}; listen {}; {}; {} client(s) refused\n", str(r, "name"),
               allow.empty() ? "everyone" : "'" + allow + "'", listen.empty() ? "on every listener" : "'" + listen + "'",
               r.value("tls_required", false) ? "TLS required" : "TLS as the server says", u64(r, "denied"));
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
