#include "gateway/metrics.hpp"

#include <fmt/format.h>

#include <cmath>

namespace blockway::gateway {

using core::Export;
using core::IoOp;
using Type = MetricsWriter::Type;

void MetricsWriter::family(std::string_view name, Type type, std::string_view help) {
  if (index_.contains(name)) return;
  index_.emplace(std::string(name), families_.size());
  families_.push_back({std::string(name), std::string(help), type, {}});
}

std::string MetricsWriter::escape_label(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

void MetricsWriter::sample(std::string_view family, const MetricLabels& labels, double value,
                           std::string_view suffix) {
  auto it = index_.find(family);
  if (it == index_.end()) throw std::logic_error("metric family " + std::string(family) + " was not declared");
  std::string& s = families_[it->second].samples;
  s += family;
  s += suffix;
  if (!labels.empty()) {
    s += '{';
    for (size_t i = 0; i < labels.size(); ++i) {
      if (i) s += ',';
      s += labels[i].first;
      s += "=\"";
      s += escape_label(labels[i].second);
      s += '"';
    }
    s += '}';
  }
  s += ' ';
  if (std::isinf(value))
    s += value > 0 ? "+Inf" : "-Inf";
  else if (std::isnan(value))
    s += "NaN";
  else
    fmt::format_to(std::back_inserter(s), "{}", value);
  s += '\n';
}

std::string MetricsWriter::text() const {
  std::string out;
  for (const auto& f : families_) {
    // HELP text escapes backslash and newline only.
    std::string help;
    for (char c : f.help) help += c == '\\' ? "\\\\" : c == '\n' ? "\\n" : std::string(1, c);
    const char* type = f.type == Type::counter ? "counter" : f.type == Type::gauge ? "gauge" : "histogram";
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", f.name, help, f.name, type);
    out += f.samples;
  }
  return out;
}

void write_io_metrics(const Export& exp, MetricsWriter& out) {
  const auto s = exp.device->stats().snapshot();
  out.family("blockway_export_requests_total", Type::counter,
             "Requests accepted by the export (after validation), per operation.");
  out.family("blockway_export_bytes_total", Type::counter,
             "Bytes covered by the accepted requests, per operation (read: bytes read, write: bytes written).");
  out.family("blockway_export_errors_total", Type::counter,
             "Requests that failed, per operation, rejected ones included.");
  out.family("blockway_export_request_duration_seconds", Type::histogram,
             "Latency of the accepted requests, from the export's checkpoint down and back.");
  for (size_t i = 0; i < core::kIoOps; ++i) {
    const auto op = static_cast<IoOp>(i);
    const auto& o = s.ops[i];
    const MetricLabels labels{{"export", exp.name}, {"op", std::string(core::to_string(op))}};
    out.sample("blockway_export_requests_total", labels, static_cast<double>(o.requests));
    out.sample("blockway_export_bytes_total", labels, static_cast<double>(o.bytes));
    out.sample("blockway_export_errors_total", labels, static_cast<double>(o.errors));
    uint64_t cumulative = 0;
    for (size_t b = 0; b < core::kLatencyBuckets; ++b) {
      cumulative += o.buckets[b];
      MetricLabels bl = labels;
      bl.emplace_back("le", b < core::kLatencyBucketsNs.size()
                                ? fmt::format("{}", static_cast<double>(core::kLatencyBucketsNs[b]) / 1e9)
                                : std::string("+Inf"));
      out.sample("blockway_export_request_duration_seconds", bl, static_cast<double>(cumulative), "_bucket");
    }
    out.sample("blockway_export_request_duration_seconds", labels, static_cast<double>(o.latency_ns) / 1e9, "_sum");
    out.sample("blockway_export_request_duration_seconds", labels, static_cast<double>(cumulative), "_count");
  }
  const MetricLabels labels{{"export", exp.name}};
  out.family("blockway_export_clients", Type::gauge, "NBD connections using the export now.");
  out.sample("blockway_export_clients", labels,
             static_cast<double>(std::max(0L, exp.clients.load(std::memory_order_relaxed))));
  out.family("blockway_export_access_denied_total", Type::counter,
             "NBD clients refused by the export's allow= or listen= rules.");
  out.sample("blockway_export_access_denied_total", labels,
             static_cast<double>(exp.denied.load(std::memory_order_relaxed)));
  out.family("blockway_export_size_bytes", Type::gauge, "Size of the export's image.");
  out.sample("blockway_export_size_bytes", labels, static_cast<double>(exp.device->geometry().size));
}

void write_cache_metrics(const Export& exp, MetricsWriter& out) {
  if (!exp.control) return;
  const auto r = exp.control->report();
  const MetricLabels labels{{"export", exp.name}};
  auto put = [&](const char* name, Type type, const char* help, double v) {
    out.family(name, type, help);
    out.sample(name, labels, v);
  };
  const auto d = [](uint64_t v) { return static_cast<double>(v); };
  put("blockway_cache_hits_total", Type::counter, "Read requests served wholly from the local cache.", d(r.hits));
  put("blockway_cache_misses_total", Type::counter, "Read requests that needed the remote.", d(r.misses));
  put("blockway_cache_present_bytes", Type::gauge, "Bytes of the image present in the local cache.",
      d(r.present_bytes));
  put("blockway_cache_dirty_bytes", Type::gauge, "Bytes in the cache not yet written back to the remote.",
      d(r.dirty_bytes));
  put("blockway_cache_fetched_bytes_total", Type::counter, "Bytes fetched from the remote into the cache.",
      d(r.bytes_fetched));
  put("blockway_cache_written_back_bytes_total", Type::counter, "Bytes written back from the cache to the remote.",
      d(r.bytes_written_back));
  put("blockway_cache_evictions_total", Type::counter, "Chunks evicted from the cache.", d(r.evictions));
  put("blockway_cache_evicted_bytes_total", Type::counter, "Bytes evicted from the cache.", d(r.evicted_bytes));
  put("blockway_cache_fetch_errors_total", Type::counter, "Failed fetches from the remote.", d(r.fetch_errors));
  put("blockway_cache_writeback_errors_total", Type::counter, "Failed write-backs to the remote.",
      d(r.writeback_errors));
  put("blockway_cache_capacity_bytes", Type::gauge, "Cache capacity (0: the whole image).", d(r.capacity));
  put("blockway_cache_file_bytes", Type::gauge, "Disk space the cache file takes now.", d(r.file_bytes));
  put("blockway_cache_detached", Type::gauge, "1 once the export runs local-only (detached).", r.detached ? 1 : 0);
  out.family("blockway_cache_mode", Type::gauge, "The export's write mode (1 for the current one).");
  out.sample("blockway_cache_mode", {{"export", exp.name}, {"mode", r.mode}}, 1);

  const auto& p = r.prefetch;
  put("blockway_prefetch_total_bytes", Type::gauge, "Bytes the background prefetch has to make present.",
      d(p.total_bytes));
  put("blockway_prefetch_done_bytes", Type::gauge, "Of those, bytes present now.", d(p.done_bytes));
  put("blockway_prefetch_rate_bytes_per_second", Type::gauge, "Prefetch speed over the last few seconds.", p.rate);
  put("blockway_prefetch_rate_limit_bytes_per_second", Type::gauge, "Prefetch rate limit (0: unlimited).",
      d(p.rate_limit));
  out.family("blockway_prefetch_state", Type::gauge, "The prefetch's state (1 for the current one).");
  for (auto st : {core::PrefetchState::idle, core::PrefetchState::running, core::PrefetchState::paused,
                  core::PrefetchState::done, core::PrefetchState::failed})
    out.sample("blockway_prefetch_state", {{"export", exp.name}, {"state", std::string(core::to_string(st))}},
               p.state == st ? 1 : 0);
}

void write_remote_metrics(const Export& exp, MetricsWriter& out) {
  const MetricLabels labels{{"export", exp.name}};
  const bool detached = exp.control && exp.control->report().detached;
  out.family("blockway_remote_connected", Type::gauge,
             "1 while the export's remote session is up (a local file always is; 0 after detach).");
  if (!exp.remote_health) {
    out.sample("blockway_remote_connected", labels, detached ? 0 : 1);
    return;
  }
  const auto h = exp.remote_health();
  out.sample("blockway_remote_connected", labels, h.connected && !detached ? 1 : 0);
  auto put = [&](const char* name, const char* help, uint64_t v) {
    out.family(name, Type::counter, help);
    out.sample(name, labels, static_cast<double>(v));
  };
  put("blockway_remote_reconnects_total", "Successful reconnects of the remote session.", h.reconnects);
  put("blockway_remote_retries_total", "Operations re-issued after a connection error.", h.retries);
  put("blockway_remote_failures_total", "Operations failed with EIO after the retries ran out.", h.failures);
}

void write_qos_metrics(const Export& exp, MetricsWriter& out) {
  if (!exp.qos) return;
  const auto st = exp.qos->stats();
  out.family("blockway_qos_limit_iops", Type::gauge, "The export's QoS operations-per-second limit (0: none).");
  out.family("blockway_qos_limit_bytes_per_second", Type::gauge, "The export's QoS bandwidth limit (0: none).");
  out.family("blockway_qos_delayed_requests_total", Type::counter, "Requests the QoS layer made wait.");
  out.family("blockway_qos_delay_seconds_total", Type::counter, "Their waits, summed.");
  out.family("blockway_qos_queued_requests", Type::gauge, "Requests waiting in the QoS layer now.");
  auto put = [&](const char* cls, const core::QosClassStats& c, uint64_t iops, uint64_t bps) {
    const MetricLabels labels{{"export", exp.name}, {"class", cls}};
    out.sample("blockway_qos_limit_iops", labels, static_cast<double>(iops));
    out.sample("blockway_qos_limit_bytes_per_second", labels, static_cast<double>(bps));
    out.sample("blockway_qos_delayed_requests_total", labels, static_cast<double>(c.delayed));
    out.sample("blockway_qos_delay_seconds_total", labels, c.delay_seconds);
    out.sample("blockway_qos_queued_requests", labels, static_cast<double>(c.queued));
  };
  put("read", st.read, st.limits.read_iops, st.limits.read_bps);
  put("write", st.write, st.limits.write_iops, st.limits.write_bps);
}

// A clone's overlay counters, one family each (blockway_overlay_<name>).
void write_overlay_metrics(const Export& exp, MetricsWriter& out) {
  if (!exp.overlay_counters) return;
  const MetricLabels labels{{"export", exp.name}, {"base", exp.clone_of}};
  for (const auto& [key, value] : exp.overlay_counters()) {
    const bool counter = key != "granularity" && key != "allocated_bytes" && key != "file_bytes" &&
                         key != "recovered" && key != "snapshots" && key != "snapshot_bytes" &&
                         (key.rfind("flatten_", 0) != 0 || key == "flatten_copied_bytes");
    const std::string name = "blockway_overlay_" + key + (counter ? "_total" : "");
    out.family(name, counter ? Type::counter : Type::gauge, "The clone's overlay: " + key + " (as in stats --json).");
    out.sample(name, labels, static_cast<double>(value));
  }
}

MetricsCollector::MetricsCollector(const core::ExportTable& exports) : exports_(exports) {
  providers_ = {write_io_metrics, write_cache_metrics, write_remote_metrics, write_qos_metrics,
                write_overlay_metrics};
}

void MetricsCollector::add_export_provider(ExportProvider provider) { providers_.push_back(std::move(provider)); }

void MetricsCollector::add_daemon_provider(DaemonProvider provider) {
  daemon_providers_.push_back(std::move(provider));
}

void write_remote_bandwidth_metrics(const core::RemoteBandwidthStats& s, MetricsWriter& out) {
  out.family("blockway_remote_bandwidth_limit_bytes_per_second", Type::gauge,
             "The daemon-wide cap on bytes per second to and from network remotes (--remote-bandwidth).");
  out.sample("blockway_remote_bandwidth_limit_bytes_per_second", {}, static_cast<double>(s.rate));
  out.family("blockway_remote_bandwidth_bytes_total", Type::counter, "Bytes charged to the remote bandwidth cap.");
  out.family("blockway_remote_bandwidth_delayed_requests_total", Type::counter, "Remote requests the cap made wait.");
  out.family("blockway_remote_bandwidth_delay_seconds_total", Type::counter, "Their waits, summed.");
  out.family("blockway_remote_bandwidth_queued_requests", Type::gauge, "Remote requests waiting for the cap now.");
  for (size_t c = 0; c < 2; ++c) {
    const MetricLabels labels{{"class", c == core::RemoteBandwidth::client ? "client" : "prefetch"}};
    out.sample("blockway_remote_bandwidth_bytes_total", labels, static_cast<double>(s.bytes[c]));
    out.sample("blockway_remote_bandwidth_delayed_requests_total", labels, static_cast<double>(s.delayed[c]));
    out.sample("blockway_remote_bandwidth_delay_seconds_total", labels, s.delay_seconds[c]);
    out.sample("blockway_remote_bandwidth_queued_requests", labels, static_cast<double>(s.queued[c]));
  }
}

std::string MetricsCollector::render() const {
  MetricsWriter out;
  out.family("blockway_build_info", Type::gauge, "Always 1; the version of the running daemon.");
  out.sample("blockway_build_info", {{"version", BLOCKWAY_VERSION}}, 1);
  const auto list = exports_.list();
  out.family("blockway_exports", Type::gauge, "Exports open now.");
  out.sample("blockway_exports", {}, static_cast<double>(list.size()));
  long clients = 0;
  for (const auto& e : list) clients += std::max(0L, e->clients.load(std::memory_order_relaxed));
  out.family("blockway_clients", Type::gauge, "NBD connections open now, all exports.");
  out.sample("blockway_clients", {}, static_cast<double>(clients));
  for (const auto& p : daemon_providers_) p(out);
  for (const auto& e : list)
    for (const auto& p : providers_) p(*e, out);
  return out.text();
}

}  // namespace blockway::gateway
