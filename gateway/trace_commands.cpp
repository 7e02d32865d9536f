#include "gateway/trace_commands.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>

#include <cerrno>

namespace blockway::gateway {

namespace asio = boost::asio;
using core::Task;

namespace {

constexpr uint64_t kDefaultCapacity = 1u << 18;  // records (48 bytes each: 12 MiB)
constexpr uint64_t kMaxCapacity = 1u << 22;
constexpr size_t kMaxRecordsPerRead = 1u << 14;
constexpr auto kIdleLimit = std::chrono::seconds(30);

const char* cache_name(core::CacheOutcome c) {
  return c == core::CacheOutcome::hit ? "hit" : c == core::CacheOutcome::miss ? "miss" : "-";
}

}  // namespace

TraceCommands::TraceCommands(asio::io_context& loop, core::ExportTable& exports)
    : loop_(loop), exports_(exports), timer_(loop) {}

std::string TraceCommands::csv_line(const core::TraceRecord& r) {
  return fmt::format("{},{},{},{},{},{},{}\n", r.start_ns, core::to_string(r.op), r.offset, r.length, r.latency_ns,
                     cache_name(r.cache), r.error);
}

void TraceCommands::add_to(ControlDispatcher& d) {
  d.add("trace-start", "start recording every request of an export {name, capacity?} -> {id, size}",
        [this](const Json& req) { return start(req); });
  d.add("trace-read", "the records of a trace since the last read, as CSV lines {id}",
        [this](const Json& req) { return read(req); });
  d.add("trace-stop", "stop a trace; returns its last records {id}", [this](const Json& req) { return stop_one(req); });
}

Task<Json> TraceCommands::start(const Json& req) {
  if (stopped_) throw ControlError("refused", ESHUTDOWN, "the daemon is shutting down");
  const std::string name = arg_string(req, "name");
  auto exp = exports_.find(name);
  if (!exp || name.empty()) throw ControlError("unknown-export", ENOENT, "no export named '" + name + "'");
  uint64_t capacity = kDefaultCapacity;
  if (req.contains("capacity")) {
    capacity = arg_size(req, "capacity");
    if (capacity == 0 || capacity > kMaxCapacity)
      throw ControlError("bad-request", EINVAL,
                         fmt::format("capacity must be 1 to {} records, not {}", kMaxCapacity, capacity));
  }
  auto trace = std::make_shared<core::IoTrace>(capacity);
  exp->device->attach_trace(trace);
  const uint64_t id = next_id_++;
  traces_[id] = Trace{exp, exp->name, trace, std::chrono::steady_clock::now()};
  if (!sweeping_) {
    sweeping_ = true;
    asio::co_spawn(loop_, sweep(), asio::detached);
  }
  co_return Json{{"id", id}, {"name", exp->name}, {"size", exp->device->geometry().size}, {"capacity", capacity}};
}

TraceCommands::Trace& TraceCommands::find(const Json& req) {
  const uint64_t id = arg_size(req, "id");
  auto it = traces_.find(id);
  if (it == traces_.end())
    throw ControlError("not-found", ENOENT, fmt::format("no trace {} (stopped, or idle for 30 s)", id));
  return it->second;
}

void TraceCommands::detach(Trace& t) {
  if (auto exp = t.exp.lock()) exp->device->detach_trace(t.trace);
}

Json TraceCommands::drain(Trace& t, bool final) {
  t.last_read = std::chrono::steady_clock::now();
  std::string csv;
  size_t n = 0;
  for (;;) {
    auto records = t.trace->drain(kMaxRecordsPerRead - n);
    for (const auto& r : records) csv += csv_line(r);
    n += records.size();
    if (!final || records.empty() || n >= kMaxRecordsPerRead) break;
  }
  Json out{{"records", std::move(csv)}, {"count", n}, {"dropped", t.trace->dropped()},
           {"recorded", t.trace->recorded()}, {"more", n >= kMaxRecordsPerRead}};
  // The export went away (removed at run time): the trace ends with it.
  auto exp = t.exp.lock();
  if (!exp || exports_.find(t.name) != exp) out["ended"] = "export '" + t.name + "' was removed";
  return out;
}

Task<Json> TraceCommands::read(const Json& req) { co_return drain(find(req), false); }

Task<Json> TraceCommands::stop_one(const Json& req) {
  Trace& t = find(req);
  detach(t);
  Json out = drain(t, true);
  if (!out["more"].get<bool>()) traces_.erase(arg_size(req, "id"));
  co_return out;
}

void TraceCommands::stop() {
  stopped_ = true;
  for (auto& [id, t] : traces_) detach(t);
  traces_.clear();
  timer_.cancel();
}

Task<void> TraceCommands::sweep() {
  while (!stopped_ && !traces_.empty()) {
    timer_.expires_after(std::chrono::seconds(1));
    co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
    const auto now = std::chrono::steady_clock::now();
    for (auto it = traces_.begin(); it != traces_.end();) {
      if (now - it->second.last_read > kIdleLimit) {
        detach(it->second);
        it = traces_.erase(it);
      } else {
        ++it;
      }
    }
  }
  sweeping_ = false;
}

}  // namespace blockway::gateway
