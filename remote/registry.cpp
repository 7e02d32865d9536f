#include "remote/registry.hpp"

#include "remote/file/file_device.hpp"
#include "remote/uri.hpp"

#include <functional>
#include <system_error>

namespace blockway::remote {
namespace {

struct Backend {
  std::string scheme;
  std::function<void(const Uri&, const OpenRequest&)> check;
  std::function<std::unique_ptr<gateway::BlockDevice>(const Uri&, const OpenRequest&)> open;
};

void check_file(const Uri& uri, const OpenRequest& req) {
  if (!uri.host.empty() && uri.host != "localhost")
    throw BackendError("file URI '" + req.uri + "' names a host; use file:///absolute/path");
  if (uri.path.empty() || uri.path == "/")
    throw BackendError("file URI '" + req.uri + "' has no path; use file:///absolute/path");
  if (!uri.query.empty()) throw BackendError("file URI '" + req.uri + "' takes no query parameters");
}

std::unique_ptr<gateway::BlockDevice> open_file(const Uri& uri, const OpenRequest& req) {
  try {
    return std::make_unique<FileDevice>(uri.path, req.read_only, *req.blocking);
  } catch (const std::system_error& e) {
    throw BackendError(e.what());
  }
}

const std::vector<Backend>& backends() {
  static const std::vector<Backend> all{
      {"file", check_file, open_file},
  };
  return all;
}

std::pair<const Backend*, Uri> resolve(const OpenRequest& req) {
  Uri uri;
  try {
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

std::unique_ptr<gateway::BlockDevice> open_device(const OpenRequest& req) {
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
