#include "remote/iscsi/iscsi_uri.hpp"

#include "remote/uri.hpp"

#include <cctype>
#include <charconv>
#include <stdexcept>

namespace blockway::remote::iscsi {
namespace {

constexpr std::string_view kScheme = "iscsi://";
constexpr int kMaxLun = 16383;  // flat/peripheral addressing as libiscsi encodes it
constexpr size_t kMaxName = 223;  // RFC 3720: iSCSI names are at most 223 bytes

[[noreturn]] void bad(std::string_view text, const std::string& why) {
  throw std::invalid_argument("iSCSI URI '" + redact_uri(text) + "': " + why +
                              " (expected iscsi://[user%password@]host[:port]/target-iqn/lun)");
}

bool valid_name_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == ':' || c == '_';
}

}  // namespace

IscsiUri IscsiUri::parse(std::string_view text) {
  IscsiUri u;
  if (!text.starts_with(kScheme)) bad(text, "not an iscsi:// URI");
  std::string_view rest = text.substr(kScheme.size());
  if (rest.find('?') != std::string_view::npos || rest.find('#') != std::string_view::npos)
    bad(text, "query parameters are not supported");
  const auto slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  const std::string_view path = slash == std::string_view::npos ? std::string_view{} : rest.substr(slash + 1);

  if (const auto at = authority.rfind('@'); at != std::string_view::npos) {
    const auto userinfo = authority.substr(0, at);
    authority = authority.substr(at + 1);
    const auto pct = userinfo.find('%');
    u.user = std::string(userinfo.substr(0, pct));
    if (pct != std::string_view::npos) u.password = std::string(userinfo.substr(pct + 1));
    if (u.user.empty()) bad(text, "empty CHAP user name before '@'");
    if (pct == std::string_view::npos || u.password.empty())
      bad(text, "CHAP user '" + u.user + "' has no password (write user%password@host)");
  }

  std::string_view port;
  if (authority.starts_with("[")) {
    const auto close = authority.find(']');
    if (close == std::string_view::npos) bad(text, "unclosed '[' in the host");
    u.host = std::string(authority.substr(1, close - 1));
    if (close + 1 < authority.size()) {
      if (authority[close + 1] != ':') bad(text, "unexpected text after ']'");
      port = authority.substr(close + 2);
      if (port.empty()) bad(text, "empty port");
    }
  } else if (const auto colon = authority.rfind(':'); colon != std::string_view::npos) {
    u.host = std::string(authority.substr(0, colon));
    if (u.host.find(':') != std::string::npos) bad(text, "write IPv6 addresses in brackets ([::1])");
    port = authority.substr(colon + 1);
    if (port.empty()) bad(text, "empty port");
  } else {
    u.host = std::string(authority);
  }
  if (u.host.empty()) bad(text, "no host");
  if (!port.empty()) {
    unsigned p = 0;
    auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
    if (ec != std::errc{} || end != port.data() + port.size() || p == 0 || p > 65535)
      bad(text, "bad port '" + std::string(port) + "'");
    u.port = static_cast<uint16_t>(p);
  }

  const auto sep = path.find('/');
  if (path.empty()) bad(text, "no target name and LUN");
  if (sep == std::string_view::npos) bad(text, "no LUN after the target name");
  const auto target = path.substr(0, sep);
  const auto lun = path.substr(sep + 1);
  if (target.empty()) bad(text, "empty target name");
  if (target.size() > kMaxName) bad(text, "target name longer than 223 bytes");
  if (!(target.starts_with("iqn.") || target.starts_with("eui.") || target.starts_with("naa.")))
    bad(text, "target name '" + std::string(target) + "' does not start with iqn., eui. or naa.");
  for (char c : target)
    if (!valid_name_char(c)) bad(text, "character '" + std::string(1, c) + "' is not allowed in a target name");
  u.target = std::string(target);
  if (lun.empty()) bad(text, "no LUN after the target name");
  int n = -1;
  auto [end, ec] = std::from_chars(lun.data(), lun.data() + lun.size(), n);
  if (ec != std::errc{} || end != lun.data() + lun.size() || n < 0 || n > kMaxLun)
    bad(text, "LUN '" + std::string(lun) + "' is not a number from 0 to " + std::to_string(kMaxLun));
  u.lun = n;
  return u;
}

std::string IscsiUri::portal() const {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

std::string IscsiUri::redacted() const {
  std::string out(kScheme);
  if (!user.empty()) out += user + "%***@";
  out += portal() + "/" + target + "/" + std::to_string(lun);
  return out;
}

}  // namespace blockway::remote::iscsi
