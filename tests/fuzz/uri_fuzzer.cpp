// libFuzzer harness: every URI and address parser, selected by the first
// input byte (mod 7): 0 the generic remote::Uri (nbd://, nbds://,
// nbd+unix://, file://), 1 iscsi://, 2 nfs://, 3 aoe:// (Uri, then the AoE
// address), 4 a listen address ([NAME=]HOST:PORT, [V6]:PORT, unix:PATH), 5 a
// metrics address, 6 rbd://.
// A refusal (an exception derived from std::exception: ConfigError,
// BackendError, std::invalid_argument) is the expected answer to bad input;
// a crash, a sanitizer report or anything else thrown is a finding.
#include "core/listen_address.hpp"
#include "core/logging.hpp"
#include "gateway/config.hpp"
#include "remote/aoe/aoe_address.hpp"
#include "remote/iscsi/iscsi_uri.hpp"
#include "remote/nfs/nfs_uri.hpp"
#include "remote/rbd/rbd_uri.hpp"
#include "remote/uri.hpp"

#include <exception>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace blockway;
  if (size == 0) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    switch (data[0] % 7) {
      case 0: {
        const auto uri = remote::Uri::parse(text);
        (void)uri.query.size();
        break;
      }
      case 1: {
        const auto uri = remote::iscsi::IscsiUri::parse(text);
        (void)uri.portal();
        (void)uri.redacted();
        break;
      }
      case 2: {
        const auto t = remote::nfs::NfsTarget::parse(text);
        (void)t.libnfs_settings_url();
        break;
      }
      case 3: {
        const auto a = remote::aoe::parse_address(remote::Uri::parse(text), text);
        (void)remote::aoe::valid_interface_name(a.interface);
        break;
      }
      case 4: (void)core::ListenAddress::parse(text).to_string(); break;
      case 5: (void)gateway::parse_metrics_address(text).to_string(); break;
      case 6: (void)remote::rbd::RbdTarget::parse(text).spec(); break;
    }
  } catch (const std::exception&) {
    // Refused with a message: the right answer to bad input.
  }
  // Redaction runs on text that did not parse too (error messages).
  (void)remote::redact_uri(text);
  return 0;
}
