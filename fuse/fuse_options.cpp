#include "fuse/fuse_options.hpp"

#include <unistd.h>

#include <climits>
#include <cstdint>

namespace blockway::fuse {

namespace {

const core::OptionSpec kFuseOptions[] = {
    {.name = "mode",
     .kind = core::OptionKind::octal,
     .help = "permission bits of the files (default 0644; read-only exports & 0444)",
     .min = 0,
     .max = 07777},
    {.name = "uid",
     .kind = core::OptionKind::number,
     .help = "owner of the files (default: the daemon's user)",
     .min = 0,
     .max = UINT32_MAX - 1},
    {.name = "gid",
     .kind = core::OptionKind::number,
     .help = "group of the files (default: the daemon's group)",
     .min = 0,
     .max = UINT32_MAX - 1},
    {.name = "allow-other",
     .kind = core::OptionKind::flag,
     .help = "let users other than the daemon's reach the mount (default off)",
     .aliases = {"allow_other"}},
    {.name = "direct-io",
     .kind = core::OptionKind::flag,
     .help = "bypass the kernel page cache (default off)",
     .aliases = {"direct_io"}},
    {.name = "readers",
     .kind = core::OptionKind::number,
     .help = "event loops that read /dev/fuse (default 1)",
     .min = 1,
     .max = 256},
    {.name = "mount-timeout",
     .kind = core::OptionKind::seconds,
     .help = "how long a mount waits for the directory to answer (default 10)",
     .min = 1,
     .max = 86400,
     .aliases = {"mount_timeout"}},
};

}  // namespace

std::span<const core::OptionSpec> FuseOptions::options() { return kFuseOptions; }

FuseOptions FuseOptions::parse(const std::map<std::string, std::string>& given) {
  enum { kMode, kUid, kGid, kAllowOther, kDirectIo, kReaders, kMountTimeout };
  std::map<std::string, std::string> values = given;
  core::Options options(values, "", "fuse option");
  FuseOptions o;
  o.uid = ::geteuid();
  o.gid = ::getegid();
  if (auto v = options.number(kFuseOptions[kMode])) o.mode = static_cast<mode_t>(*v);
  if (auto v = options.number(kFuseOptions[kUid])) o.uid = static_cast<uid_t>(*v);
  if (auto v = options.number(kFuseOptions[kGid])) o.gid = static_cast<gid_t>(*v);
  if (auto v = options.flag(kFuseOptions[kAllowOther])) o.allow_other = *v;
  if (auto v = options.flag(kFuseOptions[kDirectIo])) o.direct_io = *v;
  if (auto v = options.number(kFuseOptions[kReaders])) o.readers = static_cast<unsigned>(*v);
  if (auto v = options.seconds(kFuseOptions[kMountTimeout])) o.mount_timeout = *v;
  options.finish();
  return o;
}

}  // namespace blockway::fuse
