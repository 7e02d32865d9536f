#include "remote/rbd/rbd_backend.hpp"

#include "remote/rbd/rbd_device.hpp"
#include "remote/rbd/rbd_uri.hpp"

namespace blockway::remote::rbd {
namespace {

constexpr core::OptionSpec kIoTimeout = io_timeout_option(
    "a request the cluster does not answer this long fails with ETIMEDOUT and the RetryLayer "
    "waits for the mons (rados_osd_op_timeout, rados_mon_op_timeout; default 30)");
constexpr core::OptionSpec kOptions[] = {kIoTimeout};

RbdOptions take_options(core::Options& options) {
  RbdOptions o;
  if (auto t = options.seconds(kIoTimeout)) o.io_timeout = *t;
  return o;
}

void check(const std::string& uri, core::Options& options) {
  (void)RbdTarget::parse(uri);
  (void)take_options(options);
}

std::unique_ptr<core::RemoteDevice> open(const std::string& uri, core::Options& options, const OpenEnv& env) {
  RbdTarget target = RbdTarget::parse(uri);
  RbdOptions o = take_options(options);
  // librbd's cache only when asked for (see rbd_device.hpp: its write-around
  // mode can let a FLUSH succeed after a write it acknowledged failed).
  o.rbd_cache = target.rbd_cache;
  if (!env.blocking) throw BackendError("RBD URI '" + uri + "': no blocking pool to open it on");
  return std::make_unique<RbdDevice>(uri, std::move(target), env.read_only, o, *env.blocking);
}

}  // namespace

const Backend kBackend = Backend::network(
    "rbd", "an image or snapshot in a Ceph cluster (librbd)", {"rbd"},
    {"rbd://[ID@]POOL[/NAMESPACE]/IMAGE[@SNAP][?conf=PATH&keyring=PATH&exclusive=on|off|break&rbd_cache=on|off]"},
    kOptions, check, open);

}  // namespace blockway::remote::rbd
