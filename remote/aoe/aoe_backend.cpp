#include "remote/aoe/aoe_backend.hpp"

#include "remote/aoe/aoe_address.hpp"
#include "remote/aoe/aoe_device.hpp"

namespace blockway::remote::aoe {

void check_backend(const Uri& uri, const OpenRequest& req) {
  (void)parse_address(uri, req.uri);
  (void)parse_options(req.options, false);
}

std::unique_ptr<core::BlockDevice> open_backend(const Uri& uri, const OpenRequest& req) {
  if (req.loops == nullptr) throw BackendError("AoE URI '" + req.uri + "' needs the daemon's event loops");
  AoeAddress address = parse_address(uri, req.uri);
  const AoeOptions options = parse_options(req.options, true);
  return std::make_unique<AoeDevice>(req.uri, std::move(address), options, req.read_only, *req.loops);
}

}  // namespace blockway::remote::aoe
