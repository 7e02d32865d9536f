#include "remote/nbd/nbd_backend.hpp"

#include "remote/nbd/nbd_device.hpp"

namespace blockway::remote::nbd {
namespace {

constexpr core::OptionSpec kConnections = session_count_option(
    "connections", "connections to the server (default: one per event loop with multi-conn, else 1)");
constexpr core::OptionSpec kIoTimeout =
    io_timeout_option("a request unanswered this long drops its connection (default 30)");
constexpr core::OptionSpec kOptions[] = {kConnections, kIoTimeout};

// Validates the URI (libnbd parses it again when it connects) and takes the
// options. Throws BackendError or core::ConfigError.
NbdOptions settings(const std::string& text, core::Options& options) {
  const Uri uri = parse_uri(text);
  if (uri.scheme == "nbd") {
    if (uri.host.empty()) throw BackendError("NBD URI '" + text + "' names no host; use nbd://host[:port]/export");
    if (!uri.query.empty()) throw BackendError("NBD URI '" + text + "' takes no query parameters");
  } else {
    if (!uri.host.empty())
      throw BackendError("NBD URI '" + text + "' names a host; use nbd+unix:///export?socket=/path/to/socket");
    auto socket = uri.query.find("socket");
    if (socket == uri.query.end() || socket->second.empty())
      throw BackendError("NBD URI '" + text + "' has no socket; use nbd+unix:///export?socket=/path/to/socket");
    if (uri.query.size() != 1) throw BackendError("NBD URI '" + text + "' takes only the socket query parameter");
  }
  if (!uri.user.empty()) throw BackendError("NBD URI '" + text + "' takes no user name");
  NbdOptions o;
  if (auto n = options.number(kConnections)) o.connections = static_cast<unsigned>(*n);
  if (auto t = options.seconds(kIoTimeout)) o.io_timeout = *t;
  return o;
}

}  // namespace

namespace {

void check(const std::string& uri, core::Options& options) { (void)settings(uri, options); }

std::unique_ptr<core::RemoteDevice> open(const std::string& uri, core::Options& options, const OpenEnv& env) {
  const NbdOptions o = settings(uri, options);
  return std::make_unique<NbdDevice>(uri, env.read_only, o, loops_of(env, uri));
}

}  // namespace

const Backend kBackend =
    Backend::network("nbd", "an export of another NBD server (libnbd)", {"nbd", "nbd+unix"},
                     {"nbd://HOST[:PORT]/EXPORT", "nbd+unix:///EXPORT?socket=/path/to/socket"}, kOptions, check, open);

}  // namespace blockway::remote::nbd
