// Trace commands of the control plane: `blockway trace` attaches an IoTrace
// to an export's checkpoint (trace-start), drains it every fraction of a
// second (trace-read: CSV lines, see docs/traces.md) and detaches it
// (trace-stop).
//
// A trace holds at most `capacity` undrained records (what does not fit is
// counted as dropped), and one whose client has not read it for 30 s is
// detached by a sweep, so a killed `blockway trace` leaves no cost behind.
//
// Thread model: every handler and the sweep run on the control plane's
// event loop (loop 0), so the table needs no lock; the records come from
// every loop through IoTrace's own mutex.
#pragma once

#include "core/export.hpp"
#include "core/io_trace.hpp"
#include "gateway/control_protocol.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <map>
#include <memory>
#include <string>

namespace blockway::gateway {

class TraceCommands {
 public:
  TraceCommands(boost::asio::io_context& loop, core::ExportTable& exports);
  void add_to(ControlDispatcher& dispatcher);
  // Detaches every trace and ends the sweep (the daemon's shutdown). Loop 0.
  void stop();

  // One record as a CSV line (with its newline), as docs/traces.md describes.
  static std::string csv_line(const core::TraceRecord& r);

 private:
  struct Trace {
    std::weak_ptr<core::Export> exp;
    std::string name;
    std::shared_ptr<core::IoTrace> trace;
    std::chrono::steady_clock::time_point last_read;
  };
  core::Task<Json> start(const Json& req);
  core::Task<Json> read(const Json& req);
  core::Task<Json> stop_one(const Json& req);
  Trace& find(const Json& req);
  Json drain(Trace& t, bool final);
  void detach(Trace& t);
  core::Task<void> sweep();

  boost::asio::io_context& loop_;
  core::ExportTable& exports_;
  std::map<uint64_t, Trace> traces_;
  uint64_t next_id_ = 1;
  boost::asio::steady_timer timer_;
  bool sweeping_ = false;
  bool stopped_ = false;
};

}  // namespace blockway::gateway
