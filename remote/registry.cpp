#include "remote/registry.hpp"

#include "remote/aoe/aoe_backend.hpp"
#include "remote/file/file_device.hpp"
#include "remote/iscsi/iscsi_backend.hpp"
#include "remote/nbd/nbd_device.hpp"
#include "remote/nfs/nfs_backend.hpp"
#include "remote/uri.hpp"

#include <charconv>
#include <cmath>
#include <functional>
#include <system_error>

namespace blockway::remote {
namespace {

struct Backend {
  std::string scheme;
  std::function<void(const Uri&, const OpenRequest&)> check;
  std::function<std::unique_ptr<core::BlockDevice>(const Uri&, const OpenRequest&)> open;
};

void check_file(const Uri& uri, const OpenRequest& req) {
  if (!uri.host.empty() && uri.host != "localhost")
    throw BackendError("file URI '" + req.uri + "' names a host; use file:///absolute/path");
  if (uri.path.empty() || uri.path == "/")
    throw BackendError("file URI '" + req.uri + "' has no path; use file:///absolute/path");
  if (!uri.query.empty()) throw BackendError("file URI '" + req.uri + "' takes no query parameters");
}

std::unique_ptr<core::BlockDevice> open_file(const Uri& uri, const OpenRequest& req) {
  try {
    return std::make_unique<file::FileDevice>(uri.path, req.read_only, *req.blocking);
  } catch (const std::system_error& e) {
    throw BackendError(e.what());
  }
}

// --- nbd://host[:port]/export, nbd+unix:///export?socket=/path ---

constexpr unsigned kMaxNbdConnections = 64;

std::string option(const OpenRequest& req, const std::string& key) {
  if (req.options == nullptr) return {};
  auto it = req.options->find(key);
  return it == req.options->end() ? std::string{} : it->second;
}

bool has_option(const OpenRequest& req, const std::string& key) {
  return req.options != nullptr && req.options->contains(key);
}

nbd::NbdOptions nbd_options(const OpenRequest& req) {
  nbd::NbdOptions o;
  if (has_option(req, "connections")) {
    const std::string v = option(req, "connections");
    unsigned n = 0;
    auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
    if (ec != std::errc{} || end != v.data() + v.size() || n < 1 || n > kMaxNbdConnections)
      throw BackendError("option connections='" + v + "': expected a number from 1 to " +
                         std::to_string(kMaxNbdConnections));
    o.connections = n;
  }
  if (has_option(req, "io-timeout")) {
    const std::string v = option(req, "io-timeout");
    double seconds = 0;
    try {
      size_t used = 0;
      seconds = std::stod(v, &used);
      if (used != v.size()) seconds = -1;
    } catch (const std::exception&) {
      seconds = -1;
    }
    if (!(seconds >= 0.1 && seconds <= 86400))
      throw BackendError("option io-timeout='" + v + "': expected seconds from 0.1 to 86400");
    o.io_timeout = std::chrono::milliseconds(static_cast<int64_t>(std::llround(seconds * 1000)));
  }
  return o;
}

void check_nbd(const Uri& uri, const OpenRequest& req) {
  if (uri.scheme == "nbd") {
    if (uri.host.empty())
      throw BackendError("NBD URI '" + req.uri + "' names no host; use nbd://host[:port]/export");
    if (!uri.query.empty())
      throw BackendError("NBD URI '" + req.uri + "' takes no query parameters");
  } else {
    if (!uri.host.empty())
      throw BackendError("NBD URI '" + req.uri +
                         "' names a host; use nbd+unix:///export?socket=/path/to/socket");
    auto socket = uri.query.find("socket");
    if (socket == uri.query.end() || socket->second.empty())
      throw BackendError("NBD URI '" + req.uri +
                         "' has no socket; use nbd+unix:///export?socket=/path/to/socket");
    if (uri.query.size() != 1)
      throw BackendError("NBD URI '" + req.uri + "' takes only the socket query parameter");
  }
  if (!uri.user.empty()) throw BackendError("NBD URI '" + req.uri + "' takes no user name");
  (void)nbd_options(req);
}

std::unique_ptr<core::BlockDevice> open_nbd(const Uri&, const OpenRequest& req) {
  if (req.loops == nullptr) throw BackendError("NBD URI '" + req.uri + "' needs the daemon's event loops");
  const nbd::NbdOptions opts = nbd_options(req);
  if (req.options != nullptr) {
    req.options->erase("connections");
    req.options->erase("io-timeout");
  }
  return std::make_unique<nbd::NbdDevice>(req.uri, req.read_only, opts, *req.loops);
}

const std::vector<Backend>& backends() {
  static const std::vector<Backend> all{
      {"file", check_file, open_file},
      {"nbd", check_nbd, open_nbd},
      {"nbd+unix", check_nbd, open_nbd},
      {"iscsi", [](const Uri&, const OpenRequest& r) { iscsi::check_iscsi(r); },
       [](const Uri&, const OpenRequest& r) { return iscsi::open_iscsi(r); }},
      {"aoe", aoe::check_backend, aoe::open_backend},
      {"nfs", nfs::check_nfs, nfs::open_nfs},
  };
  return all;
}

std::pair<const Backend*, Uri> resolve(const OpenRequest& req) {
  Uri uri;
  try {
    // iscsi:// has libiscsi's own syntax (user%password is not a percent
    // escape): its backend parses the whole URI itself.
    if (req.uri.starts_with("iscsi://"))
      uri.scheme = "iscsi";
    else
      uri = Uri::parse(req.uri);
  } catch (const std::invalid_argument& e) {
    throw BackendError(e.what());
  }
  for (const auto& b : backends())
    if (b.scheme == uri.scheme) return {&b, std::move(uri)};
  std::string known;
  for (const auto& s : supported_schemes()) known += (known.empty() ? "" : ", ") + s + "://";
  throw BackendError("URI '" + req.uri + "': unknown scheme '" + uri.scheme + "' (supported: " + known + ")");
}

}  // namespace

void check_device(const OpenRequest& req) {
  auto [backend, uri] = resolve(req);
  backend->check(uri, req);
}

std::unique_ptr<core::BlockDevice> open_device(const OpenRequest& req) {
  auto [backend, uri] = resolve(req);
  backend->check(uri, req);
  return backend->open(uri, req);
}

std::vector<std::string> supported_schemes() {
  std::vector<std::string> out;
  for (const auto& b : backends()) out.push_back(b.scheme);
  return out;
}

}  // namespace blockway::remote
