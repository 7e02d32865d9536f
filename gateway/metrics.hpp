// Metrics: the daemon's counters in the Prometheus text exposition format
// (version 0.0.4), as served on GET /metrics.
//
// Every value is read from the same counters as `blockway stats --json`
// (IoStats, the cache's report, the RetryLayer's health, the client count),
// at the moment of the scrape: nothing is kept twice.
//
// Other parts of the daemon add their per-export families with
// add_export_provider(): a
// provider is called once per export per scrape and writes samples through
// a MetricsWriter, which groups them by family and escapes label values.
//
// Thread model: MetricsWriter is a local of one scrape. MetricsCollector's
// providers are registered before the daemon serves (not synchronised);
// render() may then run on any thread (it reads atomics and reports that
// never block).
#pragma once

#include "core/export.hpp"
#include "core/remote_bandwidth.hpp"

#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace blockway::gateway {

using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class MetricsWriter {
 public:
  enum class Type { counter, gauge, histogram };
  // Declares a family (once; later calls with the same name are ignored).
  // `name` carries its unit (_bytes, _seconds) and counters end in _total.
  void family(std::string_view name, Type type, std::string_view help);
  // One sample of a declared family; `suffix` is for histogram series
  // (_bucket, _sum, _count).
  void sample(std::string_view family, const MetricLabels& labels, double value, std::string_view suffix = {});
  // The whole exposition, families in declaration order.
  [[nodiscard]] std::string text() const;

  // "a\"b\\c\n" -> a\"b\\c\n as the format wants it inside quotes.
  [[nodiscard]] static std::string escape_label(std::string_view value);

 private:
  struct Family {
    std::string name, help;
    Type type;
    std::string samples;
  };
  std::vector<Family> families_;
  std::map<std::string, size_t, std::less<>> index_;
};

class MetricsCollector {
 public:
  using ExportProvider = std::function<void(const core::Export&, MetricsWriter&)>;
  using DaemonProvider = std::function<void(MetricsWriter&)>;

  explicit MetricsCollector(const core::ExportTable& exports);
  // Adds families for every export (called in registration order).
  void add_export_provider(ExportProvider provider);
  // Adds daemon-wide families (written once per scrape, before the exports').
  void add_daemon_provider(DaemonProvider provider);
  [[nodiscard]] std::string render() const;

 private:
  const core::ExportTable& exports_;
  std::vector<ExportProvider> providers_;
  std::vector<DaemonProvider> daemon_providers_;
};

// The built-in providers (registered by MetricsCollector's constructor).
void write_io_metrics(const core::Export& exp, MetricsWriter& out);
void write_cache_metrics(const core::Export& exp, MetricsWriter& out);
void write_remote_metrics(const core::Export& exp, MetricsWriter& out);
void write_qos_metrics(const core::Export& exp, MetricsWriter& out);
// The daemon-wide remote bandwidth cap (--remote-bandwidth), labelled by
// class (`client`, `prefetch`) like `status --json`'s "remote_bandwidth".
void write_remote_bandwidth_metrics(const core::RemoteBandwidthStats& stats, MetricsWriter& out);

}  // namespace blockway::gateway
