// IscsiUri: iscsi://[user[%password]@]host[:port]/target-iqn/lun, parsed and
// checked without touching the network (libiscsi's own URL syntax, so the
// same string works with iscsi-ls, iscsi-perf and qemu).
//
// The userinfo is split at its first '%' into the CHAP user name and secret,
// as libiscsi does; it is not percent-decoded. Pure value type, no threads.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace blockway::remote::iscsi {

struct IscsiUri {
  std::string user;      // CHAP user name; empty: no CHAP
  std::string password;  // CHAP secret
  std::string host;      // without brackets for IPv6 literals
  uint16_t port = 3260;
  std::string target;    // iqn.*, eui.* or naa.*
  int lun = 0;

  // Throws std::invalid_argument with a message that quotes the URI (with
  // the password masked) and says what is wrong.
  static IscsiUri parse(std::string_view text);

  // "host:port" or "[v6]:port", as libiscsi's connect calls want it.
  [[nodiscard]] std::string portal() const;
  // The URI for logs and messages: the password never appears.
  [[nodiscard]] std::string redacted() const;
};

}  // namespace blockway::remote::iscsi
