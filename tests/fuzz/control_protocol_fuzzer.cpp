// libFuzzer harness: the control protocol (gateway::ControlDispatcher::handle)
// fed one request line, with commands that take their arguments through the
// real helpers (arg_string, arg_bool, arg_size) as the daemon's do. Checks
// the protocol's promise: every line, however malformed, gets one complete
// JSON response with "ok".
#include "core/logging.hpp"
#include "gateway/control_protocol.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include <cstdlib>
#include <string_view>

namespace {

using blockway::gateway::ControlDispatcher;
using blockway::gateway::ControlError;
using blockway::gateway::Json;

ControlDispatcher make_dispatcher() {
  blockway::core::init_logging("off");
  ControlDispatcher d;
  d.add("status", "no arguments", [](const Json&) -> blockway::core::Task<Json> { co_return Json::object(); });
  d.add("export-add", "name, uri, read-only", [](const Json& r) -> blockway::core::Task<Json> {
    Json out;
    out["name"] = blockway::gateway::arg_string(r, "name");
    out["uri"] = blockway::gateway::arg_string(r, "uri");
    out["read-only"] = blockway::gateway::arg_bool(r, "read-only", false);
    co_return out;
  });
  d.add("qos", "a size", [](const Json& r) -> blockway::core::Task<Json> {
    co_return Json{{"bytes", blockway::gateway::arg_size(r, "limit")}};
  });
  d.add("refuse", "always refuses", [](const Json&) -> blockway::core::Task<Json> {
    throw ControlError("refused", 16, "busy");
    co_return Json();
  });
  return d;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ControlDispatcher dispatcher = make_dispatcher();
  const std::string_view line(reinterpret_cast<const char*>(data), size);
  boost::asio::io_context ctx;
  std::string response;
  boost::asio::co_spawn(
      ctx, [&]() -> blockway::core::Task<void> { response = co_await dispatcher.handle(line); },
      [](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);  // handle() must never throw
      });
  ctx.run();
  const Json parsed = Json::parse(response, nullptr, false);
  if (parsed.is_discarded() || !parsed.is_object() || !parsed.contains("ok") || !parsed["ok"].is_boolean() ||
      response.find('\n') != std::string::npos)
    std::abort();  // not one complete JSON response line
  return 0;
}
