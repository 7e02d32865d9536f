#include "cli/command.hpp"

#include "cli/control_client.hpp"
#include "cli/exit_codes.hpp"

#include <cstdio>

namespace blockway::cli {
namespace {

const Command kCommands[] = {
    {"info",
     "info [--json] URI   size, flags and block sizes of an NBD export, e.g.\n"
     "                    blockway info nbd://localhost/demo\n"
     "                    blockway info 'nbd+unix:///demo?socket=/run/blockway.sock'",
     info_command, false},
    {"status",
     "status              every export: mode, size, cached/dirty bytes, prefetch,\n"
     "                    remote health, clients",
     status_command},
    {"stats", "stats NAME          one export's state and counters", stats_command},
    {"export",
     "export list         exports (--names: names only)\n"
     "export add NAME URI [OPTIONS]\n"
     "                    add an export (OPTIONS as on blockwayd --export), saved\n"
     "                    so that the daemon opens it again at start\n"
     "export remove NAME [--force]",
     export_command},
    {"clone",
     "clone BASE NAME [--overlay DIR] [--granularity SIZE] [--ro]\n"
     "                    add NAME, a copy-on-write clone of the export BASE: its\n"
     "                    writes in a local overlay, the rest read through BASE",
     clone_command},
    {"snapshot",
     "snapshot create|delete CLONE SNAPSHOT | snapshot list CLONE\n"
     "                    freeze a clone's content as a snapshot (new writes go\n"
     "                    on top), list them, or delete one (merged, online)",
     snapshot_command},
    {"revert",
     "revert CLONE SNAPSHOT [--force]\n"
     "                    discard the clone's writes since its newest snapshot",
     revert_command},
    {"flatten",
     "flatten CLONE [--rate RATE] [--wait] | --cancel | --status\n"
     "                    copy the blocks a clone reads from its base into its\n"
     "                    overlay (background, resumable), so the base can go",
     flatten_command},
    {"export-image",
     "export-image NAME FILE [--force]\n"
     "                    write a full standalone raw image of an export (a clone,\n"
     "                    a snapshot CLONE@SNAP), sparse where zero",
     export_image_command},
    {"prefetch",
     "prefetch start|pause|resume|status NAME\n"
     "prefetch NAME [--wait [--timeout SECONDS]]\n"
     "                    start (or resume) copying the image into the cache;\n"
     "                    --wait follows it with a progress bar\n"
     "prefetch rate NAME RATE\n"
     "                    limit the prefetch (50M = 50 MiB/s, 0 = unlimited)",
     prefetch_command},
    {"profile",
     "profile show NAME | profile export|import NAME FILE [--force]\n"
     "                    the export's access profile (first-read order, for\n"
     "                    prefetch hot-first): show it, write it to FILE, or take\n"
     "                    it from FILE written for the same image on another host",
     profile_command},
    {"cache",
     "cache drop NAME [--keep-profile]\n"
     "                    empty the export's cache (nothing dirty), keeping its\n"
     "                    access profile with --keep-profile",
     cache_command},
    {"detach",
     "detach NAME [--force]\n"
     "                    run the export from its cache alone, without the remote",
     detach_command},
    {"mode", "mode NAME MODE      writethrough, writeback or writeback-local", mode_command},
    {"qos",
     "qos NAME [--read-iops N] [--write-iops N] [--read-bps SIZE] [--write-bps SIZE]\n"
     "         [--burst SECONDS] | --off\n"
     "                    show or change the export's QoS limits (kept across restarts)",
     qos_command},
    {"remote-bandwidth",
     "remote-bandwidth [RATE]\n"
     "                    show the daemon-wide remote bandwidth cap, or change it\n"
     "                    until the next start (100M; 0 lifts it)",
     remote_bandwidth_command},
    {"access",
     "access NAME [--allow RULES] [--listen NAMES]\n"
     "                    show or change who may use the export over NBD (kept\n"
     "                    across restarts)",
     access_command},
    {"flush", "flush NAME          flush the export", flush_command},
    {"mount", "mount DIR           mount the FUSE front end at DIR: every export as a file", mount_command},
    {"unmount", "unmount             unmount it", unmount_command},
    {"connect",
     "connect NAME [/dev/nbdN] [--read-only] [--connections N] [...]\n"
     "                    attach the export as a kernel block device (kept across\n"
     "                    daemon restarts)",
     connect_command},
    {"disconnect", "disconnect /dev/nbdN [--force]\n                    detach a kernel device", disconnect_command},
    {"devices", "devices             the kernel devices the daemon serves", devices_command},
    {"trace",
     "trace NAME --seconds N FILE\n"
     "                    record every request of the export into FILE (CSV)\n"
     "trace --summary FILE\n"
     "                    latency percentiles and hottest regions of a trace",
     trace_command},
};

void add_entries(std::string& out, bool daemon) {
  for (const auto& c : kCommands) {
    if (c.daemon != daemon) continue;
    std::string_view help = c.help;
    while (!help.empty()) {
      const auto nl = help.find('\n');
      out += "  ";
      out += help.substr(0, nl);
      out += "\n";
      help = nl == std::string_view::npos ? std::string_view{} : help.substr(nl + 1);
    }
  }
}

}  // namespace

std::span<const Command> commands() { return kCommands; }

std::string usage() {
  std::string out = "Usage: blockway COMMAND [ARGS]\n\nCommands:\n";
  add_entries(out, false);
  out +=
      "\nCommands that talk to the running daemon (its control socket: --socket PATH,\n"
      "or $BLOCKWAY_SOCKET, default /run/blockway/control.sock for root):\n";
  add_entries(out, true);
  out += "Every command takes --help; read commands take --json.\n\nExit codes:\n";
  for (const auto& e : kExitCodes) out += "  " + std::to_string(e.code) + "  " + std::string(e.meaning) + "\n";
  out +=
      "\n  --version           print the version\n"
      "  --help              this text\n";
  return out;
}

int run_command(const std::string& name, const std::vector<std::string>& args) {
  for (const auto& c : kCommands) {
    if (c.name != name) continue;
    try {
      return c.run(args);
    } catch (const CliError& e) {
      std::fprintf(stderr, "blockway %s: %s\n", name.c_str(), e.what());
      return e.code;
    } catch (const Json::exception& e) {
      std::fprintf(stderr, "blockway %s: unexpected answer from the daemon: %s\n", name.c_str(), e.what());
      return kProtocol;
    }
  }
  return -1;
}

}  // namespace blockway::cli
