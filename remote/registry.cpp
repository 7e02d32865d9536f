#include "remote/registry.hpp"

#include "remote/aoe/aoe_backend.hpp"
#include "remote/file/file_backend.hpp"
#include "remote/iscsi/iscsi_backend.hpp"
#include "remote/nbd/nbd_backend.hpp"
#include "remote/nfs/nfs_backend.hpp"

#include <algorithm>
#include <cctype>

namespace blockway::remote {

// Adding a backend is one entry here (see docs/adding-a-backend.md).
const std::vector<Backend>& backends() {
  static const std::vector<Backend> table{
      {.name = "file",
       .summary = "a raw image file or block device on this host",
       .schemes = {"file"},
       .uri_forms = {"file:///path/to/image"},
       .options = file::options(),
       .check = file::check,
       .open_local = file::open},
      {.name = "nbd",
       .summary = "an export of another NBD server (libnbd)",
       .schemes = {"nbd", "nbd+unix"},
       .uri_forms = {"nbd://HOST[:PORT]/EXPORT", "nbd+unix:///EXPORT?socket=/path/to/socket"},
       .options = nbd::options(),
       .check = nbd::check,
       .open_remote = nbd::open},
      {.name = "iscsi",
       .summary = "one LUN of an iSCSI target (libiscsi; CHAP with USER%PASSWORD)",
       .schemes = {"iscsi"},
       .uri_forms = {"iscsi://[USER%PASSWORD@]HOST[:PORT]/TARGET-IQN/LUN"},
       .options = iscsi::options(),
       .check = iscsi::check,
       .open_remote = iscsi::open},
      {.name = "nfs",
       .summary = "an image file on an NFS server, NFSv3 (default) or NFSv4 (libnfs)",
       .schemes = {"nfs"},
       .uri_forms = {"nfs://SERVER[:PORT]/PATH/TO/IMAGE[?version=3|4]"},
       .options = nfs::options(),
       .check = nfs::check,
       .open_remote = nfs::open},
      {.name = "aoe",
       .summary = "a disk on an ATA-over-Ethernet target (shelf.slot) on a local network interface",
       .schemes = {"aoe"},
       .uri_forms = {"aoe://IFACE/SHELF.SLOT"},
       .options = aoe::options(),
       .check = aoe::check,
       .open_remote = aoe::open},
  };
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
