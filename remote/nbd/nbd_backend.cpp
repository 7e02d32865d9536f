#include "remote/nbd/nbd_backend.hpp"

#include "remote/nbd/nbd_device.hpp"

#include <sys/stat.h>
#include <unistd.h>

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
  const bool tls = uri.scheme == "nbds" || uri.scheme == "nbds+unix";
  const bool unix_socket = uri.scheme.ends_with("+unix");
  const std::string scheme = uri.scheme;
  if (!unix_socket) {
    if (uri.host.empty())
      throw BackendError("NBD URI '" + text + "' names no host; use " + scheme + "://host[:port]/export");
  } else {
    if (!uri.host.empty())
      throw BackendError("NBD URI '" + text + "' names a host; use " + scheme +
                         ":///export?socket=/path/to/socket");
    auto socket = uri.query.find("socket");
    if (socket == uri.query.end() || socket->second.empty())
      throw BackendError("NBD URI '" + text + "' has no socket; use " + scheme +
                         ":///export?socket=/path/to/socket");
  }
  // TLS (nbds): libnbd reads these query parameters itself; they are checked
  // here so a mistake stops the start with a clear message.
  for (const auto& [key, value] : uri.query) {
    if (key == "socket" && unix_socket) continue;
    const bool tls_key = key == "tls-certificates" || key == "tls-psk-file" || key == "tls-verify-peer";
    if (!tls_key || !tls) {
      if (!tls && !unix_socket) throw BackendError("NBD URI '" + text + "' takes no query parameters");
      if (!tls) throw BackendError("NBD URI '" + text + "' takes only the socket query parameter");
      throw BackendError("NBD URI '" + text + "': unknown query parameter '" + key +
                         "' (nbds takes tls-certificates, tls-psk-file, tls-verify-peer" +
                         (unix_socket ? ", socket)" : ")"));
    }
    if (key == "tls-verify-peer" && value != "true" && value != "false")
      throw BackendError("NBD URI '" + text + "': tls-verify-peer is true or false");
    struct stat st {};
    if (key == "tls-certificates") {
      if (::stat(value.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        throw BackendError("NBD URI '" + text + "': tls-certificates '" + value + "' is not a directory");
      if (::access((value + "/ca-cert.pem").c_str(), R_OK) != 0)
        throw BackendError("NBD URI '" + text + "': tls-certificates has no readable ca-cert.pem");
    }
    if (key == "tls-psk-file" && ::access(value.c_str(), R_OK) != 0)
      throw BackendError("NBD URI '" + text + "': tls-psk-file '" + value + "' cannot be read");
  }
  if (!uri.user.empty() && !tls)
    throw BackendError("NBD URI '" + text + "' takes no user name (a PSK identity needs nbds://)");
  if (tls && !uri.user.empty() && !uri.query.contains("tls-psk-file"))
    throw BackendError("NBD URI '" + text + "': a user name is a PSK identity; add ?tls-psk-file=FILE");
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
    Backend::network("nbd", "an export of another NBD server (libnbd), in plaintext or over TLS (nbds)",
                     {"nbd", "nbd+unix", "nbds", "nbds+unix"},
                     {"nbd://HOST[:PORT]/EXPORT", "nbd+unix:///EXPORT?socket=/path/to/socket",
                      "nbds://[PSK-USER@]HOST[:PORT]/EXPORT?tls-certificates=DIR|tls-psk-file=FILE",
                      "nbds+unix://[PSK-USER@]/EXPORT?socket=/path&tls-certificates=DIR|tls-psk-file=FILE"},
                     kOptions, check, open);

}  // namespace blockway::remote::nbd
