#include "remote/file/file_backend.hpp"

#include "remote/file/file_device.hpp"

#include <system_error>

namespace blockway::remote::file {
namespace {

// The path the URI names. Throws BackendError.
std::string path_of(const std::string& text) {
  const Uri uri = parse_uri(text);
  if (!uri.host.empty() && uri.host != "localhost")
    throw BackendError("file URI '" + text + "' names a host; use file:///absolute/path");
  if (uri.path.empty() || uri.path == "/")
    throw BackendError("file URI '" + text + "' has no path; use file:///absolute/path");
  if (!uri.query.empty()) throw BackendError("file URI '" + text + "' takes no query parameters");
  return uri.path;
}

}  // namespace

namespace {

void check(const std::string& uri, core::Options& /*options*/) { (void)path_of(uri); }

std::unique_ptr<core::BlockDevice> open(const std::string& uri, core::Options& /*options*/, const OpenEnv& env) {
  const std::string path = path_of(uri);
  try {
    return std::make_unique<FileDevice>(path, env.read_only, *env.blocking);
  } catch (const std::system_error& e) {
    throw BackendError(e.what());
  }
}

}  // namespace

const Backend kBackend = Backend::on_this_host("file", "a raw image file or block device on this host", {"file"},
                                               {"file:///path/to/image"}, {}, check, open);

}  // namespace blockway::remote::file
