#include "cli/trace_summary.hpp"

#include "cli/format.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <stdexcept>
#include <string_view>

namespace blockway::cli {

namespace {

constexpr std::string_view kMagic = "# blockway trace v1";
constexpr std::string_view kColumns = "start_ns,op,offset,length,latency_ns,cache,error";

template <typename T>
T field(std::string_view text, size_t line, const char* what) {
  T v{};
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc{} || end != text.data() + text.size())
    throw std::runtime_error(fmt::format("line {}: {} '{}' is not a number", line, what, text));
  return v;
}

std::string ms(uint64_t ns) { return fmt::format("{:.3f}", static_cast<double>(ns) / 1e6); }

}  // namespace

TraceFile read_trace(std::istream& in) {
  TraceFile t;
  std::string line;
  size_t n = 0;
  if (!std::getline(in, line) || !line.starts_with(kMagic))
    throw std::runtime_error("line 1: not a blockway trace (it starts with \"" + std::string(kMagic) + "\")");
  ++n;
  t.header = line.substr(std::min(line.size(), kMagic.size() + 1));
  if (!std::getline(in, line) || line != kColumns)
    throw std::runtime_error("line 2: expected the column names " + std::string(kColumns));
  ++n;
  static const std::vector<std::string> ops{"read", "write", "flush", "trim", "zero", "block_status", "prefetch"};
  while (std::getline(in, line)) {
    ++n;
    if (line.empty() || line.front() == '#') continue;  // comments: the end-of-trace line
    std::vector<std::string_view> f;
    std::string_view rest = line;
    for (size_t pos; (pos = rest.find(',')) != std::string_view::npos; rest.remove_prefix(pos + 1))
      f.push_back(rest.substr(0, pos));
    f.push_back(rest);
    if (f.size() != 7) throw std::runtime_error(fmt::format("line {}: {} fields, expected 7", n, f.size()));
    TraceFileRecord r;
    r.start_ns = field<uint64_t>(f[0], n, "start_ns");
    r.op = std::string(f[1]);
    if (std::find(ops.begin(), ops.end(), r.op) == ops.end())
      throw std::runtime_error(fmt::format("line {}: unknown operation '{}'", n, r.op));
    r.offset = field<uint64_t>(f[2], n, "offset");
    r.length = field<uint64_t>(f[3], n, "length");
    r.latency_ns = field<uint64_t>(f[4], n, "latency_ns");
    r.cache = std::string(f[5]);
    if (r.cache != "hit" && r.cache != "miss" && r.cache != "-")
      throw std::runtime_error(fmt::format("line {}: cache must be hit, miss or -, not '{}'", n, r.cache));
    r.error = field<int>(f[6], n, "error");
    t.records.push_back(std::move(r));
  }
  return t;
}

uint64_t percentile(const std::vector<uint64_t>& sorted, double p) {
  if (sorted.empty()) return 0;
  // The epsilon keeps 99.9 % of 1000 at rank 999 despite binary rounding.
  const auto rank = static_cast<size_t>(std::ceil(p * static_cast<double>(sorted.size()) / 100.0 - 1e-9));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

nlohmann::json summarize_trace(const TraceFile& trace, uint64_t region, size_t top) {
  struct Op {
    uint64_t count = 0, bytes = 0, errors = 0, hits = 0, misses = 0;
    std::vector<uint64_t> latencies;
  };
  std::map<std::string, Op> ops;
  struct Region {
    uint64_t requests = 0, bytes = 0, reads = 0, writes = 0;
  };
  std::map<uint64_t, Region> regions;
  uint64_t last_ns = 0;
  for (const auto& r : trace.records) {
    auto& o = ops[r.op];
    ++o.count;
    o.bytes += r.length;
    if (r.error) ++o.errors;
    if (r.cache == "hit") ++o.hits;
    if (r.cache == "miss") ++o.misses;
    o.latencies.push_back(r.latency_ns);
    last_ns = std::max(last_ns, r.start_ns + r.latency_ns);
    if (r.op == "flush") continue;  // no range
    auto& g = regions[r.offset / region];
    ++g.requests;
    g.bytes += r.length;
    if (r.op == "read") ++g.reads;
    if (r.op == "write") ++g.writes;
  }
  nlohmann::json out;
  out["header"] = trace.header;
  out["records"] = trace.records.size();
  out["duration_seconds"] = static_cast<double>(last_ns) / 1e9;
  nlohmann::json jops = nlohmann::json::object();
  for (auto& [name, o] : ops) {
    std::sort(o.latencies.begin(), o.latencies.end());
    jops[name] = {{"count", o.count}, {"bytes", o.bytes}, {"errors", o.errors},   {"cache_hits", o.hits},
                  {"cache_misses", o.misses},
                  {"latency_ns", {{"p50", percentile(o.latencies, 50)}, {"p90", percentile(o.latencies, 90)},
                                  {"p99", percentile(o.latencies, 99)}, {"p99.9", percentile(o.latencies, 99.9)},
                                  {"max", o.latencies.back()}}}};
  }
  out["ops"] = std::move(jops);
  std::vector<std::pair<uint64_t, Region>> hot(regions.begin(), regions.end());
  // Most requests first; ties by offset, so the order is stable.
  std::stable_sort(hot.begin(), hot.end(),
                   [](const auto& a, const auto& b) { return a.second.requests > b.second.requests; });
  if (hot.size() > top) hot.resize(top);
  nlohmann::json jhot = nlohmann::json::array();
  for (const auto& [index, g] : hot)
    jhot.push_back({{"offset", index * region}, {"length", region}, {"requests", g.requests}, {"bytes", g.bytes},
                    {"reads", g.reads}, {"writes", g.writes}});
  out["region_size"] = region;
  out["hottest_regions"] = std::move(jhot);
  return out;
}

std::string format_trace_summary(const nlohmann::json& s) {
  std::string out = fmt::format("trace:    {}\nrecords:  {} over {:.3f} s\n\n", s["header"].get<std::string>(),
                                s["records"].get<uint64_t>(), s["duration_seconds"].get<double>());
  out += fmt::format("{:<13}{:>9}{:>12}{:>7}{:>8}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}\n", "op", "count", "bytes",
                     "errors", "hits", "misses", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms");
  for (const auto& [name, o] : s["ops"].items()) {
    const auto& l = o["latency_ns"];
    out += fmt::format("{:<13}{:>9}{:>12}{:>7}{:>8}{:>8}{:>10}{:>10}{:>10}{:>10}{:>10}\n", name,
                       o["count"].get<uint64_t>(), bytes(o["bytes"].get<uint64_t>()), o["errors"].get<uint64_t>(),
                       o["cache_hits"].get<uint64_t>(), o["cache_misses"].get<uint64_t>(), ms(l["p50"]),
                       ms(l["p90"]), ms(l["p99"]), ms(l["p99.9"]), ms(l["max"]));
  }
  out += fmt::format("\nhottest regions ({} each):\n", bytes(s["region_size"].get<uint64_t>()));
  out += fmt::format("  {:>16}  {:>9}  {:>12}  {:>8}  {:>8}\n", "offset", "requests", "bytes", "reads", "writes");
  for (const auto& g : s["hottest_regions"])
    out += fmt::format("  {:>16}  {:>9}  {:>12}  {:>8}  {:>8}\n", g["offset"].get<uint64_t>(),
                       g["requests"].get<uint64_t>(), bytes(g["bytes"].get<uint64_t>()), g["reads"].get<uint64_t>(),
                       g["writes"].get<uint64_t>());
  return out;
}

}  // namespace blockway::cli
