// Uri: the parts of a backend URI (scheme://[user@]host[:port]/path?query).
//
// Pure value type, no threads.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

namespace blockway::remote {

struct Uri {
  std::string scheme;  // lower case, without "://"
  std::string user;    // percent-decoded userinfo, may be empty
  std::string host;    // without brackets for IPv6 literals
  std::optional<uint16_t> port;
  std::string path;    // percent-decoded, starts with '/' when present
  std::map<std::string, std::string> query;

  // Throws std::invalid_argument with a message that quotes the URI.
  static Uri parse(std::string_view text);
};

// The URI as it may be shown (status, logs, messages, exported profiles):
// a password in its userinfo, `user%password@` as libiscsi spells it or
// `user:password@`, becomes `***`. Works on text that does not parse too
// (error messages quote what the user gave); never throws. Over-redacts a
// user name that holds a percent escape rather than risk showing a secret.
[[nodiscard]] std::string redact_uri(std::string_view text);

}  // namespace blockway::remote
