// blockway trace NAME --seconds N FILE: records every request of an export
// into a trace file (docs/traces.md); blockway trace --summary FILE prints
// what one holds.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"
#include "cli/trace_summary.hpp"
#include "core/options.hpp"

#include <fmt/format.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <thread>

namespace blockway::cli {
namespace {

volatile std::sig_atomic_t interrupted = 0;

const std::string kTraceUsage =
    "Usage: blockway trace NAME --seconds N FILE [--capacity RECORDS] [--socket PATH]\n"
    "       blockway trace --summary FILE [--region SIZE] [--top N] [--json]\n\n"
    "The first form records every request of export NAME for N seconds (Ctrl-C ends\n"
    "it sooner) into FILE: start time, operation, offset, length, latency, cache hit\n"
    "or miss and error of each, as CSV (docs/traces.md). The daemon keeps at most\n"
    "RECORDS undrained records (default 262144; more are dropped and counted).\n"
    "The second form prints per operation the count, bytes, errors, cache hits and\n"
    "misses and latency percentiles (p50, p90, p99, p99.9, max), and the TOP (10)\n"
    "regions of SIZE (default 1M) with the most requests.";

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

int summary(const Args& a) {
  need_positionals(a, 1, kTraceUsage);
  uint64_t region = 1 << 20;
  size_t top = 10;
  try {
    if (a.options.contains("--region")) region = core::parse_size(a.option("--region"), "--region");
    if (region == 0) throw core::ConfigError("--region must be larger than 0");
    if (a.options.contains("--top")) top = core::parse_number(a.option("--top"), "--top", 1, 1000000);
  } catch (const core::ConfigError& e) {
    throw CliError(kUsage, std::string(e.what()) + "\n" + kTraceUsage);
  }
  std::ifstream in(a.positional[0]);
  if (!in) throw CliError(kFailed, "cannot open " + a.positional[0]);
  TraceFile t;
  try {
    t = read_trace(in);
  } catch (const std::runtime_error& e) {
    throw CliError(kFailed, a.positional[0] + ": " + e.what());
  }
  const auto s = summarize_trace(t, region, top);
  if (a.has("--json"))
    print_json(s);
  else
    std::fputs(format_trace_summary(s).c_str(), stdout);
  return kOk;
}

int record(const Args& a) {
  need_positionals(a, 2, kTraceUsage);
  if (!a.options.contains("--seconds")) throw CliError(kUsage, "--seconds N is required\n" + kTraceUsage);
  double seconds = 0;
  try {
    seconds = static_cast<double>(core::parse_seconds(a.option("--seconds"), "--seconds", 0.001, 86400).count()) /
              1000;
  } catch (const core::ConfigError& e) {
    throw CliError(kUsage, std::string(e.what()) + "\n" + kTraceUsage);
  }
  const std::string name = a.positional[0], path = a.positional[1];
  Json req{{"name", name}};
  if (a.options.contains("--capacity")) {
    try {
      req["capacity"] = core::parse_number(a.option("--capacity"), "--capacity", 1, 1u << 22);
    } catch (const core::ConfigError& e) {
      throw CliError(kUsage, std::string(e.what()) + "\n" + kTraceUsage);
    }
  }
  std::ofstream out(path, std::ios::trunc);
  if (!out) throw CliError(kFailed, "cannot create " + path);
  ControlClient c(control_socket_path(a.option("--socket")));
  const Json started = c.call("trace-start", req);
  const uint64_t id = u64(started, "id");
  out << "# blockway trace v1 export=" << str(started, "name") << " size=" << u64(started, "size")
      << " started=" << utc_now() << "\nstart_ns,op,offset,length,latency_ns,cache,error\n"
      << std::flush;  // on disk once the trace runs: a script can wait for it
  interrupted = 0;
  auto* previous = std::signal(SIGINT, [](int) { interrupted = 1; });
  const auto begin = std::chrono::steady_clock::now();
  const auto deadline =
      begin + std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds));
  uint64_t written = 0, dropped = 0;
  std::string ended;
  auto take = [&](const Json& r) {
    out << str(r, "records");
    written += u64(r, "count");
    dropped = u64(r, "dropped");
    if (r.contains("ended")) ended = str(r, "ended");
    return r.value("more", false);
  };
  while (!interrupted && ended.empty() && std::chrono::steady_clock::now() < deadline) {
    const auto left = deadline - std::chrono::steady_clock::now();
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(left, std::chrono::milliseconds(200)));
    while (take(c.call("trace-read", {{"id", id}}))) {
    }
  }
  while (take(c.call("trace-stop", {{"id", id}}))) {
  }
  std::signal(SIGINT, previous);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  out << fmt::format("# end: {} records, {} dropped, {:.3f} s{}\n", written, dropped, took,
                     ended.empty() ? "" : ", " + ended);
  out.close();
  if (!out) throw CliError(kFailed, "writing " + path + " failed");
  if (!ended.empty())
    throw CliError(kFailed, fmt::format("{} after {:.1f} s; {} records written to {}", ended, took, written, path));
  fmt::print("traced '{}' for {:.1f} s: {} records, {} dropped, in {}\n", name, took, written, dropped, path);
  return kOk;
}

}  // namespace

int trace_command(const std::vector<std::string>& in) {
  auto a = parse_args(in, kTraceUsage, {"--summary"}, {"--seconds", "--capacity", "--region", "--top"});
  if (a.help) return std::puts(kTraceUsage.c_str()), kOk;
  return a.has("--summary") ? summary(a) : record(a);
}

}  // namespace blockway::cli
