// blockway status | export | prefetch | detach | mode | flush | stats: the
// daemon's control plane from the command line (see cli/control_client.hpp).
#include "cli/command.hpp"
#include "cli/control_client.hpp"

#include "gateway/config.hpp"

#include <fmt/format.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

namespace blockway::cli {
namespace {

// The command line of one subcommand: positionals, flags, options with a value.
struct Args {
  std::vector<std::string> positional;
  std::set<std::string> flags;
  std::map<std::string, std::string> options;
  bool help = false;

  [[nodiscard]] bool has(const std::string& f) const { return flags.contains(f); }
  [[nodiscard]] std::string option(const std::string& o) const {
    auto it = options.find(o);
    return it == options.end() ? std::string() : it->second;
  }
};

// Every subcommand accepts --json, --socket PATH and --help besides its own.
Args parse_args(const std::vector<std::string>& in, const std::string& usage, std::set<std::string> flags,
                std::set<std::string> options) {
  flags.insert("--json");
  options.insert("--socket");
  Args a;
  for (size_t i = 0; i < in.size(); ++i) {
    std::string arg = in[i];
    if (arg == "--help" || arg == "-h") {
      a.help = true;
      continue;
    }
    if (arg.starts_with("--") && arg.size() > 2) {
      std::string value;
      bool has_value = false;
      if (auto eq = arg.find('='); eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_value = true;
      }
      if (flags.contains(arg) && !has_value) {
        a.flags.insert(arg);
      } else if (options.contains(arg)) {
        if (!has_value) {
          if (i + 1 >= in.size()) throw CliError(kUsage, arg + " needs a value\n" + usage);
          value = in[++i];
        }
        a.options[arg] = value;
      } else {
        throw CliError(kUsage, "unknown option '" + in[i] + "'\n" + usage);
      }
      continue;
    }
    a.positional.push_back(arg);
  }
  return a;
}

void need_positionals(const Args& a, size_t n, const std::string& usage) {
  if (a.positional.size() < n) throw CliError(kUsage, "missing argument\n" + usage);
  if (a.positional.size() > n) throw CliError(kUsage, "unexpected argument '" + a.positional[n] + "'\n" + usage);
}

std::string bytes(uint64_t n) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 5) v /= 1024, ++u;
  return u == 0 ? fmt::format("{} B", n) : fmt::format("{:.1f} {}", v, units[u]);
}

std::string duration(double seconds) {
  if (seconds < 0 || !std::isfinite(seconds)) return "--:--";
  const auto s = static_cast<uint64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60);
  return fmt::format("{}:{:02}", s / 60, s % 60);
}

uint64_t u64(const Json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<uint64_t>() : 0;
}
double dbl(const Json& j, const char* key, double fallback = 0) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : fallback;
}
std::string str(const Json& j, const char* key, const std::string& fallback = "") {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
}

void print_json(const Json& j) { std::puts(j.dump(2).c_str()); }

// A saved export that failed to open ("failed: REASON"), not an open one.
bool failed_export(const Json& e) { return str(e, "state", "open") != "open"; }

// "done 3.2% at 12.0 MB/s" for status lines.
std::string prefetch_summary(const Json& p) {
  if (!p.is_object()) return "-";
  const auto state = str(p, "state", "?");
  if (state == "idle") return "idle";
  std::string s = fmt::format("{} {:.1f}%", state, dbl(p, "percent"));
  if (state == "running") s += fmt::format(" {:.1f} MB/s ETA {}", dbl(p, "rate") / 1e6, duration(dbl(p, "eta_seconds", -1)));
  // Why it failed, or why a finished prefetch has not detached yet.
  if (const auto why = str(p, "error"); !why.empty()) s += " (" + why + ")";
  return s;
}

std::string remote_summary(const Json& r) {
  if (!r.is_object()) return "-";
  const auto kind = str(r, "kind");
  if (kind == "local") return "local";
  if (kind == "detached") return "detached";
  return r.value("connected", false) ? "connected" : "DOWN";
}

// ---- status / stats / export list ----

int cmd_status(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway status [--json] [--socket PATH]\n\n"
      "Every export of the running daemon: mode, size, cached and dirty bytes,\n"
      "prefetch progress, remote health and connected clients.";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 0, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("status");
  if (a.has("--json")) return print_json(r), kOk;
  const auto& list = r.at("exports");
  if (list.empty()) {
    std::puts("no exports");
    return kOk;
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
  return kOk;
}

int cmd_stats(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway stats NAME [--json] [--socket PATH]\n\n"
      "One export's state and its counters since the daemon started: requests and\n"
      "bytes, cache hits and misses, bytes fetched and written back, errors.";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 1, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json e = c.call("stats", {{"name", a.positional[0]}});
  if (a.has("--json")) return print_json(e), kOk;
  if (failed_export(e)) {
    fmt::print("export:    {}\nuri:       {}\noptions:   {}\nstate:     {}\n", str(e, "name"), str(e, "uri"),
               str(e, "options"), str(e, "state"));
    return kOk;
  }
  fmt::print("export:    {}\nuri:       {}\nbackend:   {}\nsize:      {} ({} bytes){}\nmode:      {}\nclients:   {}\n",
             str(e, "name"), str(e, "uri"), str(e, "backend"), bytes(u64(e, "size")), u64(e, "size"),
             e.value("read_only", false) ? ", read-only" : "", str(e, "mode"), u64(e, "clients"));
  const auto& r = e["remote"];
  fmt::print("remote:    {}", remote_summary(r));
  if (str(r, "kind") == "network")
    fmt::print(" (session {}, {} reconnects, {} retries, {} failures{})", u64(r, "generation"), u64(r, "reconnects"),
               u64(r, "retries"), u64(r, "failures"),
               r.contains("last_error") ? ", last error: " + str(r, "last_error") : "");
  std::puts("");
  const auto& io = e["io"];
  fmt::print("requests:  {} reads ({}), {} writes ({}), {} flushes, {} trims, {} zeroes, {} block-status, "
             "{} prefetches, {} errors\n",
             u64(io, "reads"), bytes(u64(io, "bytes_read")), u64(io, "writes"), bytes(u64(io, "bytes_written")),
             u64(io, "flushes"), u64(io, "trims"), u64(io, "zeroes"), u64(io, "block_status"),
             u64(io, "prefetches"), u64(io, "errors"));
  if (e["cache"].is_object()) {
    const auto& k = e["cache"];
    fmt::print("cache:     {} ({} chunks{}{})\n", str(k, "path"), bytes(u64(k, "chunk_size")),
               u64(k, "capacity") ? ", capacity " + bytes(u64(k, "capacity")) : "",
               k.value("detached", false) ? ", detached" : "");
    fmt::print("           present {}, dirty {}, on disk {}, {} hits, {} misses, fetched {}, written back {}\n",
               bytes(u64(k, "present_bytes")), bytes(u64(k, "dirty_bytes")), bytes(u64(k, "file_bytes")),
               u64(k, "hits"), u64(k, "misses"), bytes(u64(k, "bytes_fetched")), bytes(u64(k, "bytes_written_back")));
    fmt::print("           {} evictions ({}), {} fetch errors, {} write-back errors, {} failed requests{}\n",
               u64(k, "evictions"), bytes(u64(k, "evicted_bytes")), u64(k, "fetch_errors"),
               u64(k, "writeback_errors"), u64(k, "failed_requests"),
               k.value("recovered", false) ? ", recovered after an unclean stop" : "");
    if (u64(k, "lost_write_reports"))
      fmt::print("           the remote lost acknowledged writes in {} reconnect(s); {} chunks written again\n",
                 u64(k, "lost_write_reports"), u64(k, "replayed_chunks"));
    fmt::print("prefetch:  {}\n", prefetch_summary(e["prefetch"]));
  } else {
    std::puts("cache:     none");
  }
  return kOk;
}

int cmd_export(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway export list [--json] [--names]\n"
      "       blockway export add NAME URI [OPTIONS]    (or NAME=URI[,OPTIONS] as on --export)\n"
      "       blockway export remove NAME [--force]\n"
      "  (each also takes --socket PATH)\n\n"
      "add opens the export at once and saves it in the daemon's catalogue, so it is\n"
      "opened again at every start; OPTIONS is the option list of blockwayd --export,\n"
      "e.g. ro,cache=/var/cache/blockway,mode=writeback.\n"
      "remove refuses while clients are connected; with --force the export takes no\n"
      "new clients at once and is closed when the connected ones leave. A saved export\n"
      "that failed to open at start (list shows \"failed: REASON\") is simply forgotten.";
  auto a = parse_args(in, usage, {"--force", "--names"}, {});
  if (a.positional.empty()) {
    if (a.help) return std::puts(usage.c_str()), kOk;
    throw CliError(kUsage, "missing subcommand (list, add or remove)\n" + usage);
  }
  if (a.help) return std::puts(usage.c_str()), kOk;
  const std::string sub = a.positional[0];
  a.positional.erase(a.positional.begin());
  if (sub == "list") {
    need_positionals(a, 0, usage);
    ControlClient c(control_socket_path(a.option("--socket")));
    const Json r = c.call("list");
    if (a.has("--json")) return print_json(r), kOk;
    if (a.has("--names")) {
      for (const auto& e : r.at("exports")) std::puts(str(e, "name").c_str());
      return kOk;
    }
    fmt::print("{:<16} {:<15} {:>10} {:>7}  {}\n", "NAME", "MODE", "SIZE", "CLIENTS", "URI");
    for (const auto& e : r.at("exports")) {
      if (failed_export(e)) {
        fmt::print("{:<16} {:<15} {:>10} {:>7}  {}  ({})\n", str(e, "name"), "failed", "-", "-", str(e, "uri"),
                   str(e, "state"));
        continue;
      }
      fmt::print("{:<16} {:<15} {:>10} {:>7}  {}\n", str(e, "name"),
                 str(e, "mode") + (e.value("read_only", false) ? ",ro" : ""), bytes(u64(e, "size")),
                 u64(e, "clients"), str(e, "uri"));
    }
    return kOk;
  }
  if (sub == "add") {
    std::string name, uri, options;
    if (a.positional.size() == 1 && a.positional[0].find('=') != std::string::npos) {
      const auto& spec = a.positional[0];
      const auto eq = spec.find('=');
      name = spec.substr(0, eq);
      const auto rest = spec.substr(eq + 1);
      const auto comma = rest.find(',');
      uri = rest.substr(0, comma);
      if (comma != std::string::npos) options = rest.substr(comma + 1);
    } else {
      if (a.positional.size() < 2 || a.positional.size() > 3)
        throw CliError(kUsage, "export add needs NAME URI [OPTIONS]\n" + usage);
      name = a.positional[0];
      uri = a.positional[1];
      if (a.positional.size() == 3) options = a.positional[2];
    }
    ControlClient c(control_socket_path(a.option("--socket")));
    Json req{{"name", name}, {"uri", uri}};
    if (!options.empty()) req["options"] = options;
    const Json r = c.call("export-add", req);
    if (a.has("--json")) return print_json(r), kOk;
    fmt::print("export '{}' added: {} ({}, {})\n", name, str(r, "backend"), bytes(u64(r, "size")), str(r, "mode"));
    return kOk;
  }
  if (sub == "remove") {
    need_positionals(a, 1, usage);
    ControlClient c(control_socket_path(a.option("--socket")));
    const Json r = c.call("export-remove", {{"name", a.positional[0]}, {"force", a.has("--force")}});
    if (a.has("--json")) return print_json(r), kOk;
    std::puts(str(r, "message", "removed").c_str());
    return kOk;
  }
  throw CliError(kUsage, "unknown export subcommand '" + sub + "'\n" + usage);
}

// ---- prefetch ----

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

int cmd_prefetch(const std::vector<std::string>& in) {
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
    const std::string text = a.option("--timeout");
    char* end = nullptr;
    timeout = std::strtod(text.c_str(), &end);
    // At most ten years: the deadline is a steady_clock time point, which a
    // larger count of seconds would overflow.
    if (text.empty() || *end != '\0' || !std::isfinite(timeout) || timeout <= 0 || timeout > 315360000)
      throw CliError(kUsage, "--timeout needs a number of seconds greater than 0 (at most 315360000), not '" + text +
                                 "'\n" + usage);
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
        rate = gateway::parse_size(text, "rate");
      } catch (const gateway::ConfigError& e) {
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

// ---- detach / mode / flush ----

int cmd_detach(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway detach NAME [--force] [--socket PATH]\n\n"
      "Switches the export to local-only operation once every chunk is in its cache:\n"
      "the remote is closed and never contacted again, clients stay connected, and\n"
      "the cache file is the image. Refused while chunks are missing (run prefetch\n"
      "first) or dirty; --force waits for dirty chunks to be written back first.";
  auto a = parse_args(in, usage, {"--force"}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 1, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("detach", {{"name", a.positional[0]}, {"force", a.has("--force")}});
  if (a.has("--json")) return print_json(r), kOk;
  std::puts(str(r, "message", "export '" + a.positional[0] + "' detached: it now runs without its remote").c_str());
  return kOk;
}

int cmd_mode(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway mode NAME writethrough|writeback|writeback-local [--socket PATH]\n\n"
      "Changes the write mode of the export's cache at run time; leaving a write-back\n"
      "mode writes dirty data back first where the new mode needs it.";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 2, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("mode", {{"name", a.positional[0]}, {"mode", a.positional[1]}});
  if (a.has("--json")) return print_json(r), kOk;
  std::puts(str(r, "message", "export '" + a.positional[0] + "' now in mode " + a.positional[1]).c_str());
  return kOk;
}

int cmd_flush(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway flush NAME [--socket PATH]\n\n"
      "Flushes the export: every write acknowledged so far reaches stable storage\n"
      "(in write-back modes, the cache's stable storage).";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 1, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("flush", {{"name", a.positional[0]}});
  if (a.has("--json")) return print_json(r), kOk;
  std::puts(str(r, "message", "export '" + a.positional[0] + "' flushed").c_str());
  return kOk;
}

// ---- mount / unmount (the FUSE front end) ----

int cmd_mount(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway mount DIR [--socket PATH]\n\n"
      "Mounts the daemon's FUSE front end at DIR (created if missing): every export\n"
      "appears there as a regular file named after it. A stale mount left at DIR by\n"
      "a crashed daemon is cleaned first; a live one is refused. Options (mode, uid,\n"
      "allow-other, direct-io...) come from the daemon's [fuse] settings.";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 1, usage);
  // The daemon has its own working directory: send an absolute path.
  const std::string dir = std::filesystem::absolute(a.positional[0]).lexically_normal().string();
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("mount", {{"dir", dir}});
  if (a.has("--json")) return print_json(r), kOk;
  std::printf("exports mounted at %s\n", str(r, "mountpoint", dir).c_str());
  return kOk;
}

int cmd_unmount(const std::vector<std::string>& in) {
  const std::string usage =
      "Usage: blockway unmount [--socket PATH]\n\n"
      "Unmounts the daemon's FUSE front end. Files still open keep being served until\n"
      "they are closed (or the daemon's shutdown timeout ends); NBD is not affected.";
  auto a = parse_args(in, usage, {}, {});
  if (a.help) return std::puts(usage.c_str()), kOk;
  need_positionals(a, 0, usage);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json r = c.call("unmount", Json::object());
  if (a.has("--json")) return print_json(r), kOk;
  std::printf("unmounted %s\n", str(r, "mountpoint", "").c_str());
  return kOk;
}

}  // namespace

int control_command(const std::string& cmd, const std::vector<std::string>& args) {
  try {
    if (cmd == "status") return cmd_status(args);
    if (cmd == "stats") return cmd_stats(args);
    if (cmd == "export") return cmd_export(args);
    if (cmd == "prefetch") return cmd_prefetch(args);
    if (cmd == "detach") return cmd_detach(args);
    if (cmd == "mode") return cmd_mode(args);
    if (cmd == "flush") return cmd_flush(args);
    if (cmd == "mount") return cmd_mount(args);
    if (cmd == "unmount") return cmd_unmount(args);
  } catch (const CliError& e) {
    std::fprintf(stderr, "blockway %s: %s\n", cmd.c_str(), e.what());
    return e.code;
  } catch (const Json::exception& e) {
    std::fprintf(stderr, "blockway %s: unexpected answer from the daemon: %s\n", cmd.c_str(), e.what());
    return kProtocol;
  }
  return -1;  // not a control command
}

}  // namespace blockway::cli
