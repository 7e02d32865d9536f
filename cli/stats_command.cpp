// blockway stats NAME: one export's state and counters.
#include "cli/command.hpp"

#include "cli/args.hpp"
#include "cli/format.hpp"

#include <fmt/format.h>

#include <cstdio>

namespace blockway::cli {

int stats_command(const std::vector<std::string>& in) {
  OneRequest command{
      .usage = "Usage: blockway stats NAME [--json] [--socket PATH]\n\n"
               "One export's state and its counters since the daemon started: requests and\n"
               "bytes, cache hits and misses, bytes fetched and written back, errors, QoS\n"
               "limits and the requests they delayed.",
      .positionals = 1};
  command.request = [](const Args& a) { return Request("stats", {{"name", a.positional[0]}}); };
  command.print = [](const Args&, const Json& e) {
    if (failed_export(e)) {
      fmt::print("export:    {}\nuri:       {}\noptions:   {}\nstate:     {}\n", str(e, "name"), str(e, "uri"),
                 str(e, "options"), str(e, "state"));
      return;
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
    if (e.contains("clone") && e["clone"].is_object()) {
      const auto& c = e["clone"];
      fmt::print("clone:     of '{}', overlay {}, owns {}, {} read through the base\n", str(c, "base"), str(c, "path"),
                 bytes(u64(c, "allocated_bytes")), bytes(u64(c, "base_read_bytes")));
      if (c.contains("flatten") && str(c["flatten"], "state") != "none") {
        const auto& f = c["flatten"];
        fmt::print("flatten:   {}, {} of {} held by the clone{}\n", str(f, "state"), bytes(u64(f, "done_bytes")),
                   bytes(u64(f, "total_bytes")),
                   str(f, "state") == "done" ? " (it no longer needs its base)"
                   : u64(f, "rate")          ? ", at " + bytes(u64(f, "rate")) + "/s"
                                             : "");
      }
    }
    if (e["qos"].is_object())
      fmt::print("qos:       burst {} s\n{}", dbl(e["qos"], "burst"), qos_summary(e["qos"], "           "));
    return;
  };
  return run_one_request(in, command);
}

}  // namespace blockway::cli
