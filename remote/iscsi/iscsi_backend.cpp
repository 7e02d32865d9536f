#include "remote/iscsi/iscsi_backend.hpp"

#include "remote/common/command_slots.hpp"

#include <stdexcept>

namespace blockway::remote::iscsi {
namespace {

constexpr core::OptionSpec kSessions =
    session_count_option("sessions", "sessions logged in to the target (default: one per event loop)");
constexpr core::OptionSpec kIoTimeout =
    io_timeout_option("a command unanswered this long drops its session (default 30)");
constexpr core::OptionSpec kInitiator{.name = "initiator",
                                      .kind = core::OptionKind::text,
                                      .help = "the initiator name to log in with (default "
                                              "iqn.2026-11.io.blockway:initiator)",
                                      .value = "IQN"};
constexpr core::OptionSpec kWriteSame{.name = "write-same",
                                      .kind = core::OptionKind::flag,
                                      .help = "write-zeroes as WRITE SAME without UNMAP on a LUN that is not thin: "
                                              "the target writes the zeroes (default on; off: send them)"};
constexpr core::OptionSpec kOptions[] = {kSessions, kIoTimeout, kInitiator, common::kInflightKibOption, kWriteSame};

IscsiUri parse_uri(const std::string& uri) {
  try {
    return IscsiUri::parse(uri);
  } catch (const std::invalid_argument& e) {
    throw BackendError(e.what());
  }
}

}  // namespace

IscsiOptions take_options(core::Options& options) {
  IscsiOptions o;
  if (auto n = options.number(kSessions)) o.sessions = static_cast<unsigned>(*n);
  if (auto t = options.seconds(kIoTimeout)) o.io_timeout = *t;
  if (auto name = options.text(kInitiator)) {
    if (name->empty() || name->size() > 223 ||
        !(name->starts_with("iqn.") || name->starts_with("eui.") || name->starts_with("naa.")))
      throw core::ConfigError(options.what(kInitiator) + "='" + *name +
                              "': expected an iSCSI name (iqn.YYYY-MM.domain:name)");
    o.initiator = *name;
  }
  if (auto budget = common::take_inflight_budget(options)) o.inflight_bytes = *budget;
  if (auto on = options.flag(kWriteSame)) o.write_same = *on;
  return o;
}

namespace {

void check(const std::string& uri, core::Options& options) {
  (void)parse_uri(uri);
  (void)take_options(options);
}

std::unique_ptr<core::RemoteDevice> open(const std::string& text, core::Options& options, const OpenEnv& env) {
  IscsiUri uri = parse_uri(text);
  IscsiOptions o = take_options(options);
  core::EventLoops& loops = loops_of(env, uri.redacted());
  return std::make_unique<IscsiDevice>(std::move(uri), env.read_only, std::move(o), loops);
}

}  // namespace

const Backend kBackend =
    Backend::network("iscsi", "one LUN of an iSCSI target (libiscsi; CHAP with USER%PASSWORD)", {"iscsi"},
                     {"iscsi://[USER%PASSWORD@]HOST[:PORT]/TARGET-IQN/LUN"}, kOptions, check, open);

}  // namespace blockway::remote::iscsi
