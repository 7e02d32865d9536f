#include "remote/nfs/nfs_backend.hpp"

#include "remote/common/command_slots.hpp"
#include "remote/nfs/nfs_device.hpp"
#include "remote/nfs/nfs_uri.hpp"

namespace blockway::remote::nfs {
namespace {

constexpr core::OptionSpec kConnections =
    session_count_option("connections", "sessions mounted on the server (default: one per event loop)");
constexpr core::OptionSpec kIoTimeout =
    io_timeout_option("an RPC unanswered this long drops its session (default 30)");
constexpr core::OptionSpec kKeepalive{.name = "keepalive",
                                      .kind = core::OptionKind::seconds,
                                      .help = "NFSv4: an idle session renews its lease this often "
                                              "(default 20; 0: never)",
                                      .min = 0,
                                      .max = 86400};
constexpr core::OptionSpec kOptions[] = {kConnections, kIoTimeout, kKeepalive, common::kInflightKibOption};

NfsOptions take_options(core::Options& options) {
  NfsOptions o;
  if (auto n = options.number(kConnections)) o.connections = static_cast<unsigned>(*n);
  if (auto t = options.seconds(kIoTimeout)) o.io_timeout = *t;
  if (auto t = options.seconds(kKeepalive)) o.keepalive = *t;
  if (auto budget = common::take_inflight_budget(options)) o.inflight_bytes = *budget;
  return o;
}

}  // namespace

namespace {

void check(const std::string& uri, core::Options& options) {
  (void)NfsTarget::parse(uri);
  (void)take_options(options);
}

std::unique_ptr<core::RemoteDevice> open(const std::string& uri, core::Options& options, const OpenEnv& env) {
  NfsTarget target = NfsTarget::parse(uri);
  const NfsOptions o = take_options(options);
  return std::make_unique<NfsDevice>(uri, std::move(target), env.read_only, o, loops_of(env, uri));
}

}  // namespace

const Backend kBackend =
    Backend::network("nfs", "an image file on an NFS server, NFSv3 (default) or NFSv4 (libnfs)", {"nfs"},
                     {"nfs://SERVER[:PORT]/PATH/TO/IMAGE[?version=3|4]"}, kOptions, check, open);

}  // namespace blockway::remote::nfs
