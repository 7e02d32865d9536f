#include "remote/registry.hpp"

#include "remote/aoe/aoe_backend.hpp"
#include "remote/file/file_backend.hpp"
#include "remote/iscsi/iscsi_backend.hpp"
#include "remote/nbd/nbd_backend.hpp"
#include "remote/nfs/nfs_backend.hpp"
#include "remote/rbd/rbd_backend.hpp"

#include <algorithm>
#include <cctype>

namespace blockway::remote {

// Adding a backend is one line here, its entry (kBackend) in its own NAME_backend.cpp
// (see docs/adding-a-backend.md).
const std::vector<Backend>& backends() {
  static const std::vector<Backend> table{file::kBackend, nbd::kBackend, iscsi::kBackend, nfs::kBackend,
                                          aoe::kBackend, rbd::kBackend};
  return table;
}

const Backend& backend_for(const std::string& uri) {
  const auto sep = uri.find("://");
  if (sep == std::string::npos || sep == 0)
    throw BackendError("'" + uri + "' is not a URI (expected scheme://...)");
  std::string scheme = uri.substr(0, sep);
  for (auto& c : scheme) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const auto& b : backends())
    if (std::find(b.schemes.begin(), b.schemes.end(), scheme) != b.schemes.end()) return b;
  std::string known;
  for (const auto& s : supported_schemes()) known += (known.empty() ? "" : ", ") + s + "://";
  throw BackendError("URI '" + uri + "': unknown scheme '" + scheme + "' (supported: " + known + ")");
}

void check(const std::string& uri, core::Options& options) { backend_for(uri).check(uri, options); }

std::vector<std::string> supported_schemes() {
  std::vector<std::string> out;
  for (const auto& b : backends())
    for (auto s : b.schemes) out.emplace_back(s);
  return out;
}

}  // namespace blockway::remote
