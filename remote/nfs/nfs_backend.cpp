#include "remote/nfs/nfs_backend.hpp"

#include "remote/common/command_slots.hpp"
#include "remote/nfs/nfs_device.hpp"
#include "remote/nfs/nfs_uri.hpp"

#include <charconv>
#include <cmath>

namespace blockway::remote::nfs {
namespace {

constexpr unsigned kMaxConnections = 64;

const std::string* find_option(const OpenRequest& req, const std::string& key) {
  if (req.options == nullptr) return nullptr;
  auto it = req.options->find(key);
  return it == req.options->end() ? nullptr : &it->second;
}

std::chrono::milliseconds seconds_option(const std::string& key, const std::string& v, double min) {
  double seconds = -1;
  try {
    size_t used = 0;
    seconds = std::stod(v, &used);
    if (used != v.size()) seconds = -1;
  } catch (const std::exception&) {
    seconds = -1;
  }
  if (!(seconds >= min && seconds <= 86400))
    throw BackendError("option " + key + "='" + v + "': expected seconds from " + (min > 0 ? "0.1" : "0") +
                       " to 86400");
  return std::chrono::milliseconds(static_cast<int64_t>(std::llround(seconds * 1000)));
}

NfsOptions nfs_options(const OpenRequest& req) {
  NfsOptions o;
  if (const auto* v = find_option(req, "connections")) {
    unsigned n = 0;
    auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
    if (ec != std::errc{} || end != v->data() + v->size() || n < 1 || n > kMaxConnections)
      throw BackendError("option connections='" + *v + "': expected a number from 1 to " +
                         std::to_string(kMaxConnections));
    o.connections = n;
  }
  if (const auto* v = find_option(req, "io-timeout")) o.io_timeout = seconds_option("io-timeout", *v, 0.1);
  if (const auto* v = find_option(req, "keepalive")) o.keepalive = seconds_option("keepalive", *v, 0);
  if (const auto* v = find_option(req, "inflight-kib")) {
    try {
      o.inflight_bytes = common::parse_inflight_kib(*v);
    } catch (const std::invalid_argument& e) {
      throw BackendError(e.what());
    }
  }
  return o;
}

}  // namespace

void check_nfs(const Uri& /*uri*/, const OpenRequest& req) {
  (void)NfsTarget::parse(req.uri);
  (void)nfs_options(req);
}

std::unique_ptr<core::BlockDevice> open_nfs(const Uri& /*uri*/, const OpenRequest& req) {
  if (req.loops == nullptr) throw BackendError("NFS URI '" + req.uri + "' needs the daemon's event loops");
  NfsTarget target = NfsTarget::parse(req.uri);
  const NfsOptions opts = nfs_options(req);
  if (req.options != nullptr) {
    req.options->erase("connections");
    req.options->erase("io-timeout");
    req.options->erase("keepalive");
    req.options->erase("inflight-kib");
  }
  return std::make_unique<NfsDevice>(req.uri, std::move(target), req.read_only, opts, *req.loops);
}

}  // namespace blockway::remote::nfs
