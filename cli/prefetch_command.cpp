// blockway prefetch start | pause | resume | status | rate, and prefetch NAME
// [--wait]: the background copy of an image into its cache.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/control_client.hpp"
#include "cli/format.hpp"

#include "core/options.hpp"

#include <fmt/format.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <thread>
#include <cstdio>

namespace blockway::cli {

namespace {

volatile std::sig_atomic_t g_interrupted = 0;

int terminal_width() {
  winsize ws{};
  if (::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 40) return ws.ws_col;
  return 80;
}

std::string progress_line(const std::string& name, const Json& p, bool bar) {
  const double pct = std::clamp(dbl(p, "percent"), 0.0, 100.0);
  const std::string tail = fmt::format(" {:5.1f}%  {:7.1f} MB/s  ETA {:>7}  {} / {}  {}", pct, dbl(p, "rate") / 1e6,
                                       duration(dbl(p, "eta_seconds", -1)), bytes(u64(p, "done_bytes")),
                                       bytes(u64(p, "total_bytes")), str(p, "state"));
  if (!bar) return name + ":" + tail;
  const int width = std::max(10, terminal_width() - static_cast<int>(tail.size()) - static_cast<int>(name.size()) - 6);
  const int filled = static_cast<int>(pct / 100.0 * width);
  return fmt::format("{} [{}{}]{}", name, std::string(static_cast<size_t>(filled), '#'),
                     std::string(static_cast<size_t>(width - filled), '.'), tail);
}

// Polls prefetch-status until done (0) or failed (1), drawing a bar on a
// terminal and printing a plain line each second otherwise; gives up after
// `timeout` seconds (kTimedOut; 0 = no limit).
int wait_prefetch(ControlClient& c, const std::string& name, bool json, double timeout) {
  const bool tty = ::isatty(STDOUT_FILENO) && !json;
  std::signal(SIGINT, [](int) { g_interrupted = 1; });
  auto last_line = std::chrono::steady_clock::time_point{};
  const auto poll = std::chrono::milliseconds(tty ? 250 : 500);
  const auto started = std::chrono::steady_clock::now();
  const auto deadline = started + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                      std::chrono::duration<double>(timeout));
  while (true) {
    if (timeout > 0) {
      // A daemon that stops answering cannot hold us much past the deadline either.
      const double left = std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count();
      c.set_timeout(std::max(left, 0.1));
    }
    const Json p = c.call("prefetch-status", {{"name", name}});
    const std::string state = str(p, "state");
    const auto now = std::chrono::steady_clock::now();
    const bool finished = state == "done" || state == "failed";
    if (json) {
      if (finished) print_json(p);
    } else if (tty) {
      std::printf("\r%s\033[K", progress_line(name, p, true).c_str());
      if (finished) std::puts("");
      std::fflush(stdout);
    } else if (finished || now - last_line >= std::chrono::seconds(1)) {
      std::puts(progress_line(name, p, false).c_str());
      std::fflush(stdout);
      last_line = now;
    }
    if (state == "done") {
      if (!json) fmt::print("prefetch of '{}' complete: every chunk is present\n", name);
      return kOk;
    }
    if (state == "failed") throw CliError(kFailed, "prefetch of '" + name + "' failed: " + str(p, "error", "unknown error"));
    if (state == "idle") throw CliError(kFailed, "prefetch of '" + name + "' is not running (it was stopped)");
    if (g_interrupted) {
      if (tty) std::puts("");
      std::fputs("interrupted; the prefetch goes on in the daemon\n", stderr);
      return 130;
    }
    if (timeout > 0 && now >= deadline) {
      if (tty) std::puts("");
      if (json) print_json(p);
      throw CliError(kTimedOut, fmt::format("prefetch of '{}' not complete after {} s ({:.1f}% done); it goes on "
                                            "in the daemon", name, timeout, dbl(p, "percent")));
    }
    auto pause = std::chrono::duration_cast<std::chrono::steady_clock::duration>(poll);
    if (timeout > 0) pause = std::min(pause, std::max(deadline - now, std::chrono::steady_clock::duration::zero()));
    std::this_thread::sleep_for(pause);
  }
}

}  // namespace

int prefetch_command(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway prefetch start NAME [--order sequential|hot-first] [--wait]\n"
      "       blockway prefetch pause|resume NAME\n"
      "       blockway prefetch status NAME [--json]\n"
      "       blockway prefetch rate NAME RATE     (bytes per second: 50M, 1G, 0 = unlimited)\n"
      "       blockway prefetch NAME [--wait [--timeout SECONDS]]  (start or resume, then follow it)\n"
      "  (each also takes --socket PATH)\n\n"
      "Copies every chunk of the export's image that is not yet in its cache, in the\n"
      "background. --wait follows it to the end with a progress bar (percent, MB/s,\n"
      "ETA) on a terminal and a plain line per second otherwise; it exits 0 when every\n"
      "chunk is present and 1 if the prefetch fails. --timeout SECONDS stops waiting\n"
      "after that long with exit code 7 (the prefetch goes on). Ctrl-C stops waiting,\n"
      "not the prefetch.";
  auto a = parse_args(in, usage, {"--wait"}, {"--order", "--timeout"});
  if (a.help) return std::puts(usage.c_str()), kOk;
  if (a.positional.empty()) throw CliError(kUsage, "missing subcommand or export name\n" + usage);
  static const std::set<std::string> subs{"start", "pause", "resume", "status", "rate"};
  std::string sub = a.positional[0];
  if (subs.contains(sub)) {
    a.positional.erase(a.positional.begin());
  } else {
    sub = "follow";  // blockway prefetch NAME [--wait]
  }
  need_positionals(a, sub == "rate" ? 2 : 1, usage);
  const std::string name = a.positional[0];
  double timeout = 0;
  if (a.options.contains("--timeout")) {
    // At most ten years: the deadline is a steady_clock time point, which a
    // larger count of seconds would overflow.
    try {
      timeout = static_cast<double>(core::parse_seconds(a.option("--timeout"), "--timeout", 0.001, 315360000).count()) /
                1000;
    } catch (const core::ConfigError& e) {
      throw CliError(kUsage, std::string(e.what()) + "\n" + usage);
    }
    if (!a.has("--wait")) throw CliError(kUsage, "--timeout goes with --wait\n" + usage);
  }
  ControlClient c(control_socket_path(a.option("--socket")));
  const bool json = a.has("--json");
  // Prints the daemon's own message when it sent one, else `text`.
  auto done = [&](const Json& r, const std::string& text) {
    if (json) print_json(r);
    else std::puts(str(r, "message", text).c_str());
    return kOk;
  };
  if (sub == "start" || sub == "follow") {
    Json req{{"name", name}};
    if (!a.option("--order").empty()) req["order"] = a.option("--order");
    Json r = Json::object();
    std::string what = "started";
    if (sub == "follow") {
      // Start it if idle or failed, resume it if paused, else just follow it.
      const Json p = c.call("prefetch-status", {{"name", name}});
      const auto state = str(p, "state");
      if (state == "paused") {
        r = c.call("prefetch-resume", {{"name", name}});
        what = "resumed";
      } else if (state == "running" || state == "done") {
        what = "is already " + state;
      } else {
        r = c.call("prefetch-start", req);
      }
    } else {
      r = c.call("prefetch-start", req);
    }
    if (a.has("--wait")) return wait_prefetch(c, name, json, timeout);
    return done(r, "prefetch of '" + name + "' " + what);
  }
  if (a.has("--wait")) throw CliError(kUsage, "--wait goes with start or NAME alone\n" + usage);
  if (sub == "pause") return done(c.call("prefetch-pause", {{"name", name}}), "prefetch of '" + name + "' paused");
  if (sub == "resume") return done(c.call("prefetch-resume", {{"name", name}}), "prefetch of '" + name + "' resumed");
  if (sub == "rate") {
    const std::string text = a.positional[1];
    uint64_t rate = 0;
    if (text != "unlimited" && text != "off") {
      try {
        rate = core::parse_size(text, "rate");
      } catch (const core::ConfigError& e) {
        throw CliError(kUsage, std::string(e.what()) + " (e.g. 50M for 50 MiB/s, 0 for unlimited)");
      }
    }
    const Json r = c.call("prefetch-rate", {{"name", name}, {"rate", rate}});
    if (json) return print_json(r), kOk;
    if (r.contains("warning")) std::fprintf(stderr, "blockway prefetch: warning: %s\n", str(r, "warning").c_str());
    std::puts((rate ? "prefetch of '" + name + "' limited to " + bytes(rate) + "/s"
                    : "prefetch of '" + name + "' unlimited").c_str());
    return kOk;
  }
  // status
  const Json p = c.call("prefetch-status", {{"name", name}});
  if (json) return print_json(p), kOk;
  std::puts(progress_line(name, p, false).c_str());
  fmt::print("present {} of {}, dirty {}, mode {}{}, order {}, rate limit {}\n", bytes(u64(p, "present_bytes")),
             bytes(u64(p, "size")), bytes(u64(p, "dirty_bytes")), str(p, "mode"),
             p.value("detached", false) ? " (detached)" : "", str(p, "order"),
             u64(p, "rate_limit") ? bytes(u64(p, "rate_limit")) + "/s" : "none");
  if (p.contains("error")) fmt::print("error: {}\n", str(p, "error"));
  return kOk;
}

}  // namespace blockway::cli
