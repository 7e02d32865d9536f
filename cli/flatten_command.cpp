// blockway flatten CLONE [--rate RATE] [--wait [--timeout S]] | --cancel |
// --status: copy the blocks a clone still reads from its base into its own
// overlay (in the daemon, in the background), so that it stands alone.
//
// Returns at once by default, like prefetch start: a flatten of a large image
// takes long and survives restarts, so the daemon owns it; --wait follows it
// with a progress line a second and exits with its outcome.
//
// Main thread only.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/exit_codes.hpp"
#include "cli/format.hpp"

#include "core/options.hpp"

#include <fmt/format.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <thread>

namespace blockway::cli {
namespace {

volatile std::sig_atomic_t g_interrupted = 0;

std::string rate_text(uint64_t rate) { return rate ? bytes(rate) + "/s" : "unlimited"; }

std::string progress_line(const Json& p) {
  std::string line = fmt::format("{}: flatten {} {:5.1f}%  {} / {} held by the clone, rate {}", str(p, "name"),
                                 str(p, "state"), dbl(p, "percent"), bytes(u64(p, "done_bytes")),
                                 bytes(u64(p, "total_bytes")), rate_text(u64(p, "rate")));
  if (p.contains("error")) line += ", error: " + str(p, "error");
  return line;
}

// Polls flatten-status once a second until the flatten ends.
int wait_flatten(ControlClient& c, const std::string& name, bool json, double timeout) {
  std::signal(SIGINT, [](int) { g_interrupted = 1; });
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout));
  for (;;) {
    const Json p = c.call("flatten-status", {{"name", name}});
    const std::string state = str(p, "state");
    const bool finished = state != "running";
    if (!json || finished) {
      if (json)
        print_json(p);
      else
        std::puts(progress_line(p).c_str());
      std::fflush(stdout);
    }
    if (state == "done") {
      if (!json) fmt::print("clone '{}' is flattened: it no longer needs its base '{}'\n", name, str(p, "base"));
      return kOk;
    }
    if (finished)
      throw CliError(kFailed, "flatten of clone '" + name + "' " +
                                  (state == "failed" ? "failed: " + str(p, "error", "unknown error")
                                                     : "is " + state + ", not running"));
    if (g_interrupted) {
      std::fputs("interrupted; the flatten goes on in the daemon\n", stderr);
      return 130;
    }
    if (timeout > 0 && std::chrono::steady_clock::now() >= deadline)
      throw CliError(kTimedOut, fmt::format("flatten of clone '{}' not complete after {} s ({:.1f}% done); it goes "
                                            "on in the daemon", name, timeout, dbl(p, "percent")));
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
}

}  // namespace

int flatten_command(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway flatten CLONE [--rate RATE] [--wait [--timeout SECONDS]]\n"
      "       blockway flatten CLONE --cancel\n"
      "       blockway flatten CLONE --status\n"
      "  (each also takes --json and --socket PATH)\n\n"
      "Copies every block the clone still reads from its base into its own overlay,\n"
      "in the background in the daemon, while clients keep using the clone (a block\n"
      "a client writes meanwhile is skipped, never overwritten). Once done the clone\n"
      "no longer needs its base: `blockway export remove BASE` is no longer refused\n"
      "because of it, and it opens without the base. It survives restarts (it goes on\n"
      "from where it was). Refused while the clone has snapshots.\n"
      "--rate RATE   bytes per second (50M = 50 MiB/s, at least 64k; 0 or unlimited:\n"
      "              no limit, the default); given while it runs, it changes the pace\n"
      "              (without --rate a running flatten keeps its pace)\n"
      "--wait        follow it to the end, a progress line a second (exit 0 when done,\n"
      "              1 if it fails or is cancelled); --timeout SECONDS stops waiting\n"
      "              with exit code 7 (the flatten goes on). Without --wait the command\n"
      "              returns at once; `blockway stats CLONE --json` shows \"flatten\".\n"
      "--cancel      stop it; what it copied stays in the overlay\n"
      "--status      show its progress";
  auto a = parse_args(in, usage, {"--wait", "--cancel", "--status"}, {"--rate", "--timeout"});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 1, usage);
  const std::string name = a.positional[0];
  const bool json = a.has("--json");
  if (a.has("--cancel") && a.has("--status")) throw CliError(kUsage, "--cancel and --status exclude each other\n" + usage);
  if ((a.has("--cancel") || a.has("--status")) &&
      (a.has("--wait") || a.options.contains("--rate") || a.options.contains("--timeout")))
    throw CliError(kUsage, "--rate, --wait and --timeout go with starting a flatten\n" + usage);
  double timeout = 0;
  if (a.options.contains("--timeout")) {
    if (!a.has("--wait")) throw CliError(kUsage, "--timeout goes with --wait\n" + usage);
    try {
      timeout = static_cast<double>(core::parse_seconds(a.option("--timeout"), "--timeout", 0.001, 315360000).count()) /
                1000;
    } catch (const core::ConfigError& e) {
      throw CliError(kUsage, std::string(e.what()) + "\n" + usage);
    }
  }
  uint64_t rate = 0;
  if (a.options.contains("--rate")) {
    const std::string text = a.option("--rate");
    if (text != "unlimited" && text != "0") {
      try {
        rate = core::parse_size(text, "--rate");
      } catch (const core::ConfigError& e) {
        throw CliError(kUsage, std::string(e.what()) + " (bytes per second, e.g. 50M for 50 MiB/s, 0 for unlimited)");
      }
      if (rate != 0 && rate < 64 * 1024)
        throw CliError(kUsage, "--rate " + text + " is " + std::to_string(rate) +
                                   " bytes per second; give at least 64k (e.g. 50M for 50 MiB/s), or 0 for "
                                   "unlimited");
    }
  }
  ControlClient c(control_socket_path(a.option("--socket")));
  if (a.has("--status")) {
    const Json p = c.call("flatten-status", {{"name", name}});
    if (json) return print_json(p), kOk;
    std::puts(progress_line(p).c_str());
    return kOk;
  }
  Json req{{"name", name}};
  if (a.has("--cancel"))
    req["cancel"] = true;
  else if (a.options.contains("--rate"))
    req["rate"] = rate;  // else unlimited, or a running flatten keeps its pace
  const Json r = c.call("flatten", req);
  if (a.has("--wait")) return wait_flatten(c, name, json, timeout);
  if (json) return print_json(r), kOk;
  std::puts(str(r, "message").c_str());
  return kOk;
}

}  // namespace blockway::cli
