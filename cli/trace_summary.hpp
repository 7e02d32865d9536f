// Trace files (docs/traces.md): reading one and summarising it for
// `blockway trace --summary`: per operation the count, bytes, errors, cache
// hits/misses and latency percentiles; the hottest regions of the image.
//
// Main thread only; pure functions of the file's text.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <istream>
#include <string>
#include <vector>

namespace blockway::cli {

struct TraceFileRecord {
  uint64_t start_ns = 0, offset = 0, length = 0, latency_ns = 0;
  std::string op;     // read, write, flush, trim, zero, block_status, prefetch
  std::string cache;  // hit, miss or -
  int error = 0;
};

struct TraceFile {
  std::string header;  // the "# blockway trace v1 ..." line's fields after the version
  std::vector<TraceFileRecord> records;
};

// Throws std::runtime_error naming the line for anything that is not a
// trace of this format.
TraceFile read_trace(std::istream& in);

// The summary as JSON (what --json prints) and as text for people.
// `region` is the size of a region for the hottest-regions list (> 0).
nlohmann::json summarize_trace(const TraceFile& trace, uint64_t region, size_t top);
std::string format_trace_summary(const nlohmann::json& summary);

// The nearest-rank percentile `p` (0-100] of sorted values; 0 if empty.
uint64_t percentile(const std::vector<uint64_t>& sorted, double p);

}  // namespace blockway::cli
