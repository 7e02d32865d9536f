#include "remote/aoe/aoe_backend.hpp"

#include "remote/aoe/aoe_device.hpp"

namespace blockway::remote::aoe {
namespace {

constexpr core::OptionSpec kIoTimeout =
    io_timeout_option("a frame unanswered this long, after retransmissions, drops the session (default 15)");
constexpr core::OptionSpec kDiscoverTimeout{.name = "discover-timeout",
                                            .kind = core::OptionKind::seconds,
                                            .help = "how long opening waits for the target to answer (default 5)",
                                            .min = 0.1,
                                            .max = 3600};
constexpr core::OptionSpec kOptions[] = {kIoTimeout, kDiscoverTimeout};

AoeAddress address_of(const std::string& text) { return parse_address(parse_uri(text), text); }

}  // namespace

AoeOptions take_options(core::Options& options) {
  AoeOptions o;
  if (auto t = options.seconds(kIoTimeout)) o.io_timeout = *t;
  if (auto t = options.seconds(kDiscoverTimeout)) o.discover_timeout = *t;
  return o;
}

namespace {

void check(const std::string& uri, core::Options& options) {
  (void)address_of(uri);
  (void)take_options(options);
}

std::unique_ptr<core::RemoteDevice> open(const std::string& uri, core::Options& options, const OpenEnv& env) {
  AoeAddress address = address_of(uri);
  const AoeOptions o = take_options(options);
  return std::make_unique<AoeDevice>(uri, std::move(address), o, env.read_only, loops_of(env, uri));
}

}  // namespace

const Backend kBackend =
    Backend::network("aoe", "a disk on an ATA-over-Ethernet target (shelf.slot) on a local network interface", {"aoe"},
                     {"aoe://IFACE/SHELF.SLOT"}, kOptions, check, open);

}  // namespace blockway::remote::aoe
