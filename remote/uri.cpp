#include "remote/uri.hpp"

#include <algorithm>
#include <charconv>
#include <stdexcept>

namespace blockway::remote {
namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string decode(std::string_view s, std::string_view whole) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out.push_back(s[i]);
      continue;
    }
    if (i + 2 >= s.size())
      throw std::invalid_argument("bad percent escape in URI '" + std::string(whole) + "'");
    const int hi = hex_value(s[i + 1]), lo = hex_value(s[i + 2]);
    if (hi < 0 || lo < 0) throw std::invalid_argument("bad percent escape in URI '" + std::string(whole) + "'");
    if (hi == 0 && lo == 0) throw std::invalid_argument("%00 (NUL) is not allowed in URI '" + std::string(whole) + "'");
    out.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return out;
}

}  // namespace

std::string redact_uri(std::string_view text) {
  const auto sep = text.find("://");
  if (sep == std::string_view::npos) return std::string(text);
  const auto start = sep + 3;
  const auto end = std::min(text.find_first_of("/?#", start), text.size());
  const auto at = text.substr(start, end - start).rfind('@');
  if (at == std::string_view::npos) return std::string(text);
  const auto secret = text.substr(start, at).find_first_of(":%");
  if (secret == std::string_view::npos) return std::string(text);
  return std::string(text.substr(0, start + secret + 1)) + "***" + std::string(text.substr(start + at));
}

Uri Uri::parse(std::string_view text) {
  const std::string whole = redact_uri(text);  // every message below quotes it
  Uri u;
  const auto sep = text.find("://");
  if (sep == std::string_view::npos || sep == 0)
    throw std::invalid_argument("'" + whole + "' is not a URI (expected scheme://...)");
  for (char c : text.substr(0, sep)) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '-' || c == '.'))
      throw std::invalid_argument("bad scheme in URI '" + whole + "'");
    u.scheme.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  }
  std::string_view rest = text.substr(sep + 3);
  std::string_view query;
  if (auto q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  const auto slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  if (slash != std::string_view::npos) u.path = decode(rest.substr(slash), whole);
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    u.user = decode(authority.substr(0, at), whole);
    authority = authority.substr(at + 1);
  }
  std::string_view port;
  if (authority.starts_with("[")) {
    const auto close = authority.find(']');
    if (close == std::string_view::npos) throw std::invalid_argument("unclosed '[' in URI '" + whole + "'");
    u.host = std::string(authority.substr(1, close - 1));
    if (close + 1 < authority.size()) {
      if (authority[close + 1] != ':') throw std::invalid_argument("bad host in URI '" + whole + "'");
      port = authority.substr(close + 2);
    }
  } else if (auto colon = authority.rfind(':'); colon != std::string_view::npos) {
    u.host = std::string(authority.substr(0, colon));
    if (u.host.find(':') != std::string::npos)
      throw std::invalid_argument("write IPv6 addresses in brackets ([::1]) in URI '" + whole + "'");
    port = authority.substr(colon + 1);
  } else {
    u.host = std::string(authority);
  }
  if (!port.empty()) {
    uint16_t p = 0;
    auto [ptr, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
    if (ec != std::errc{} || ptr != port.data() + port.size() || p == 0)
      throw std::invalid_argument("bad port in URI '" + whole + "'");
    u.port = p;
  }
  while (!query.empty()) {
    const auto amp = query.find('&');
    const auto item = query.substr(0, amp);
    const auto eq = item.find('=');
    if (!item.empty())
      u.query[decode(item.substr(0, eq), whole)] =
          eq == std::string_view::npos ? "" : decode(item.substr(eq + 1), whole);
    if (amp == std::string_view::npos) break;
    query = query.substr(amp + 1);
  }
  return u;
}

}  // namespace blockway::remote
