// blockway export-image NAME FILE [--force]: a full standalone raw image of an
// export (a clone, a snapshot CLONE@SNAP, any export), written by the daemon,
// sparse where the image reads zero.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <filesystem>

namespace blockway::cli {

int export_image_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway export-image NAME FILE [--force] [--json] [--socket PATH]\n\n"
               "Writes the whole content of export NAME to FILE, a plain raw image that\n"
               "needs neither blockway nor the base (a clone's image holds its writes over\n"
               "its base), sparse where it reads zero. The daemon writes FILE (a path on\n"
               "its host, mode 0600); an existing FILE is refused unless --force. A clone\n"
               "that keeps writing meanwhile gives a mix of before and after: for a\n"
               "point-in-time image, take a snapshot and export CLONE@SNAPSHOT.",
      .flags = {"--force"},
      .positionals = 2};
  command.request = [](const Args& a) {
    // The daemon has its own working directory: send an absolute path.
    const auto path = std::filesystem::absolute(a.positional[1]).lexically_normal().string();
    return Request("export-image", {{"name", a.positional[0]}, {"path", path}, {"force", a.has("--force")}});
  };
  command.print = [](const Args&, const Json& r) { fmt::print("{}\n", str(r, "message")); };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
