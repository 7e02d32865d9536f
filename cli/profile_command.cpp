// blockway profile show|export|import NAME [FILE]: an export's access profile
// (the order in which clients first read its chunks, which hot-first
// prefetch follows), shown, written to a file, or read from one written on
// another host for the same image.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/exit_codes.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <filesystem>

namespace blockway::cli {
namespace {

void print_show(const Json& r) {
  const auto& sessions = r.at("sessions");
  if (sessions.empty())
    return (void)fmt::print("export '{}' has no access profile yet (nothing read through its cache)\n", str(r, "name"));
  fmt::print("access profile of export '{}': {} sessions, {} distinct chunks ({}) of {}\n", str(r, "name"),
             sessions.size(), u64(r, "chunks"), bytes(u64(r, "bytes")), bytes(u64(r, "chunk_size")));
  size_t i = 0;
  for (const auto& s : sessions) {
    std::string first;
    for (const auto& c : s.at("first")) first += (first.empty() ? "" : " ") + std::to_string(c.get<uint64_t>());
    fmt::print("  {} {:>8} chunks ({:>10})  first read: {}{}\n", i++ == 0 ? "newest" : "      ", u64(s, "chunks"),
               bytes(u64(s, "bytes")), first, u64(s, "chunks") > s.at("first").size() ? " ..." : "");
  }
}

}  // namespace

int profile_command(const std::vector<std::string>& in) {
  static const std::string usage =
      "Usage: blockway profile show NAME [--json] [--socket PATH]\n"
      "       blockway profile export NAME FILE [--force] [--json] [--socket PATH]\n"
      "       blockway profile import NAME FILE [--force] [--json] [--socket PATH]\n\n"
      "An export's access profile is the order in which its chunks were first read\n"
      "in each of its last runs (sessions), the clones' reads of a base included;\n"
      "prefetch hot-first fetches those chunks first. show lists the sessions,\n"
      "newest first. export writes the profile to FILE (JSON, on the daemon's\n"
      "host, mode 0600; an existing FILE only with --force). import makes FILE's\n"
      "profile the export's, for the same image on another host or cache: it is\n"
      "refused when the image's size differs, and when its identity (a SHA-256 of\n"
      "its first 64 KiB and 15 blocks spread over it) differs unless --force, or\n"
      "when FILE is damaged. The export's earlier sessions are replaced; reads of\n"
      "the running session stay first.";
  OneRequest command{.usage = usage, .flags = {"--force"}, .positionals = 2, .optional_positionals = 1};
  command.request = [](const Args& a) {
    const std::string& verb = a.positional[0];
    if (verb == "show" && a.positional.size() == 2 && !a.has("--force"))
      return Request("profile-show", {{"name", a.positional[1]}});
    if ((verb == "export" || verb == "import") && a.positional.size() == 3) {
      // The daemon has its own working directory: send an absolute path.
      const auto path = std::filesystem::absolute(a.positional[2]).lexically_normal().string();
      return Request("profile-" + verb, {{"name", a.positional[1]}, {"path", path}, {"force", a.has("--force")}});
    }
    throw CliError(kUsage, usage);
  };
  command.print = [](const Args& a, const Json& r) {
    if (a.positional[0] == "show")
      print_show(r);
    else
      fmt::print("{}\n", str(r, "message"));
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
