#include "remote/nfs/nfs_uri.hpp"

#include "remote/backend.hpp"

namespace blockway::remote::nfs {
namespace {

constexpr const char* kForm = "nfs://server[:port]/path/to/image[?version=3|4]";

}  // namespace

NfsTarget NfsTarget::parse(std::string_view text) {
  const std::string whole(text);
  auto fail = [&whole](const std::string& what) {
    throw BackendError("NFS URI '" + whole + "' " + what + "; use " + kForm);
  };
  const Uri uri = parse_uri(whole);
  if (uri.scheme != "nfs") fail("does not start with nfs://");
  if (!uri.user.empty()) fail("names a user (authentication is AUTH_SYS with the daemon's uid/gid)");
  if (uri.host.empty()) fail("names no server");
  if (uri.port && *uri.port == 0) fail("has port 0");
  if (uri.path.empty() || uri.path == "/") fail("names no image file");
  if (uri.path.back() == '/') fail("ends in '/': it names a directory, not an image file");
  // libnfs takes the path as a plain string inside its own URL syntax.
  if (uri.path.find_first_of("?&#") != std::string::npos)
    fail("has '?', '&' or '#' in its path, which libnfs cannot take");
  size_t start = 1;
  while (start <= uri.path.size()) {
    size_t end = uri.path.find('/', start);
    if (end == std::string::npos) end = uri.path.size();
    const std::string_view part(uri.path.data() + start, end - start);
    if (part.empty()) fail("has an empty path component ('//')");
    if (part == "." || part == "..") fail("has '.' or '..' in its path");
    start = end + 1;
  }
  NfsTarget t;
  t.server = uri.host;
  t.port = uri.port;
  for (const auto& [key, value] : uri.query) {
    if (key != "version")
      fail("has the unknown parameter '" + key + "' (only version=3 or version=4 is taken)");
    if (value == "3") {
      t.version = 3;
    } else if (value == "4") {
      t.version = 4;
    } else {
      fail("asks for version '" + value + "' (NFS version 3 or 4 is supported)");
    }
  }
  const auto slash = uri.path.rfind('/');
  t.mount_path = slash == 0 ? "/" : uri.path.substr(0, slash);
  t.file = uri.path.substr(slash);
  return t;
}

std::string NfsTarget::libnfs_settings_url() const {
  std::string url = "nfs://";
  if (server.find(':') != std::string::npos) {
    url += "[" + server + "]";
  } else {
    url += server;
  }
  url += "/?version=" + std::to_string(version);
  if (port) url += "&nfsport=" + std::to_string(*port);
  return url;
}

}  // namespace blockway::remote::nfs
