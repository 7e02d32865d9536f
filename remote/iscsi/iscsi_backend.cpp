#include "remote/iscsi/iscsi_backend.hpp"

#include "remote/common/command_slots.hpp"

#include <charconv>
#include <cmath>
#include <stdexcept>

namespace blockway::remote::iscsi {
namespace {

constexpr unsigned kMaxSessions = 64;

const std::string* find_option(const OpenRequest& req, const char* key) {
  if (req.options == nullptr) return nullptr;
  auto it = req.options->find(key);
  return it == req.options->end() ? nullptr : &it->second;
}

IscsiUri parse_uri(const OpenRequest& req) {
  try {
    return IscsiUri::parse(req.uri);
  } catch (const std::invalid_argument& e) {
    throw BackendError(e.what());
  }
}

}  // namespace

IscsiOptions iscsi_options(const OpenRequest& req) {
  IscsiOptions o;
  if (const auto* v = find_option(req, "sessions")) {
    unsigned n = 0;
    auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
    if (ec != std::errc{} || end != v->data() + v->size() || n < 1 || n > kMaxSessions)
      throw BackendError("option sessions='" + *v + "': expected a number from 1 to " + std::to_string(kMaxSessions));
    o.sessions = n;
  }
  if (const auto* v = find_option(req, "io-timeout")) {
    double seconds = -1;
    try {
      size_t used = 0;
      seconds = std::stod(*v, &used);
      if (used != v->size()) seconds = -1;
    } catch (const std::exception&) {
      seconds = -1;
    }
    if (!(seconds >= 0.1 && seconds <= 86400))
      throw BackendError("option io-timeout='" + *v + "': expected seconds from 0.1 to 86400");
    o.io_timeout = std::chrono::milliseconds(static_cast<int64_t>(std::llround(seconds * 1000)));
  }
  if (const auto* v = find_option(req, "initiator")) {
    if (v->empty() || v->size() > 223 || !(v->starts_with("iqn.") || v->starts_with("eui.") || v->starts_with("naa.")))
      throw BackendError("option initiator='" + *v + "': expected an iSCSI name (iqn.YYYY-MM.domain:name)");
    o.initiator = *v;
  }
  if (const auto* v = find_option(req, "inflight-kib")) {
    try {
      o.inflight_bytes = common::parse_inflight_kib(*v);
    } catch (const std::invalid_argument& e) {
      throw BackendError(e.what());
    }
  }
  return o;
}

void check_iscsi(const OpenRequest& req) {
  (void)parse_uri(req);
  (void)iscsi_options(req);
}

std::unique_ptr<core::BlockDevice> open_iscsi(const OpenRequest& req) {
  IscsiUri uri = parse_uri(req);
  if (req.loops == nullptr)
    throw BackendError("iSCSI URI '" + uri.redacted() + "' needs the daemon's event loops");
  IscsiOptions opts = iscsi_options(req);
  if (req.options != nullptr) {
    req.options->erase("sessions");
    req.options->erase("io-timeout");
    req.options->erase("initiator");
    req.options->erase("inflight-kib");
  }
  return std::make_unique<IscsiDevice>(std::move(uri), req.read_only, std::move(opts), *req.loops);
}

}  // namespace blockway::remote::iscsi
