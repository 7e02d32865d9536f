#include "cli/format.hpp"

#include <fmt/format.h>

#include <cmath>
#include <cstdio>

namespace blockway::cli {

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
double dbl(const Json& j, const char* key, double fallback) {
  auto it = j.find(key);
  return it != j.end() && it->is_number() ? it->get<double>() : fallback;
}
std::string str(const Json& j, const char* key, const std::string& fallback) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
}

void print_json(const Json& j) { std::puts(j.dump(2).c_str()); }

bool failed_export(const Json& e) { return str(e, "state", "open") != "open"; }

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
  const std::string state = r.value("connected", false) ? "connected" : "DOWN";
  return r.contains("health") ? state + " " + str(r, "health") : state;
}

std::string qos_summary(const Json& q, const std::string& indent) {
  std::string out;
  for (const char* cls : {"read", "write"}) {
    const Json& c = q.contains(cls) ? q[cls] : Json::object();
    std::string limit;
    if (u64(c, "iops")) limit = fmt::format("{} IOPS", u64(c, "iops"));
    if (u64(c, "bps")) limit += (limit.empty() ? "" : ", ") + bytes(u64(c, "bps")) + "/s";
    if (limit.empty()) limit = "no limit";
    out += fmt::format("{}{:<6} {}; {} delayed ({:.2f} s in all), {} waiting\n", indent, std::string(cls) + ":", limit,
                       u64(c, "delayed"), dbl(c, "delay_seconds"), u64(c, "queued"));
  }
  return out;
}

}  // namespace blockway::cli
