// How blockway shows what the daemon answers: sizes, durations, and the
// summaries status and stats print; plus typed reads of JSON fields that
// default when a field is missing (an older daemon).
//
// Main thread only.
#pragma once

#include "cli/control_client.hpp"

#include <cstdint>
#include <string>

namespace blockway::cli {

// "512 B", "1.5 GiB".
std::string bytes(uint64_t n);
// "1:05", "2:03:04", or "--:--" when unknown.
std::string duration(double seconds);

uint64_t u64(const Json& j, const char* key);
double dbl(const Json& j, const char* key, double fallback = 0);
std::string str(const Json& j, const char* key, const std::string& fallback = "");

void print_json(const Json& j);

// A saved export that failed to open ("failed: REASON"), not an open one.
bool failed_export(const Json& e);
// "running 3.2% 12.0 MB/s ETA 1:05" for status lines.
std::string prefetch_summary(const Json& p);
// "connected", "DOWN", "local" or "detached".
std::string remote_summary(const Json& r);
// Two lines, "read:  100 IOPS, 10.0 MiB/s; 5 delayed (1.20 s in all), 2 waiting\n"
// and the same for write, from the "qos" object of stats.
std::string qos_summary(const Json& q, const std::string& indent);

}  // namespace blockway::cli
