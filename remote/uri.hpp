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

}  // namespace blockway::remote
