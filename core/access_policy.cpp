#include "core/access_policy.hpp"

#include "core/options.hpp"
#include "core/user_lookup.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <charconv>

namespace blockway::core {
namespace {

std::vector<std::string> split(std::string_view text) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && (text[i] == ' ' || text[i] == ';' || text[i] == '\t')) ++i;
    size_t j = i;
    while (j < text.size() && text[j] != ' ' && text[j] != ';' && text[j] != '\t') ++j;
    if (j > i) out.emplace_back(text.substr(i, j - i));
    i = j;
  }
  return out;
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : " ") + s;
  return out;
}

std::optional<unsigned> number(std::string_view s) {
  unsigned v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc{} || end != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

bool parse_ip(const std::string& text, std::array<uint8_t, 16>& bytes, bool& v6) {
  if (::inet_pton(AF_INET, text.c_str(), bytes.data()) == 1) {
    v6 = false;
    return true;
  }
  if (::inet_pton(AF_INET6, text.c_str(), bytes.data()) == 1) {
    v6 = true;
    return true;
  }
  return false;
}

bool same_prefix(const std::array<uint8_t, 16>& a, const std::array<uint8_t, 16>& b, unsigned prefix) {
  const unsigned whole = prefix / 8, rest = prefix % 8;
  if (!std::equal(a.begin(), a.begin() + whole, b.begin())) return false;
  if (rest == 0) return true;
  const uint8_t mask = static_cast<uint8_t>(0xff << (8 - rest));
  return (a[whole] & mask) == (b[whole] & mask);
}

}  // namespace

AccessPolicy AccessPolicy::parse(std::string_view allow, std::string_view listen) {
  AccessPolicy p;
  const auto entries = split(allow);
  for (const auto& e : entries) {
    const std::string where = "allow entry '" + e + "'";
    if (e.starts_with("cert:") || e.starts_with("psk:")) {
      const std::string name = e.substr(e.find(':') + 1);
      if (name.empty()) throw ConfigError(where + ": the name is empty");
      (e.starts_with("cert:") ? p.certs_ : p.psks_).push_back(name);
    } else if (e.starts_with("user:") || e.starts_with("group:")) {
      const bool user = e.starts_with("user:");
      const std::string name = e.substr(e.find(':') + 1);
      if (user) {
        const auto id = find_user(name);
        if (!id) throw ConfigError(where + ": no such user");
        p.uids_.push_back(*id);
      } else {
        const auto id = find_group(name);
        if (!id) throw ConfigError(where + ": no such group");
        p.gids_.push_back(*id);
      }
    } else {
      Net n;
      const auto slash = e.find('/');
      const std::string addr = e.substr(0, slash);
      if (!parse_ip(addr, n.bytes, n.v6))
        throw ConfigError(where + ": not an IP address, CIDR, cert:NAME, psk:NAME, user:NAME or group:NAME");
      const unsigned max = n.v6 ? 128 : 32;
      n.prefix = max;
      if (slash != std::string::npos) {
        auto len = number(std::string_view(e).substr(slash + 1));
        if (!len || *len > max)
          throw ConfigError(where + ": the prefix length must be 0 to " + std::to_string(max));
        n.prefix = *len;
      }
      p.nets_.push_back(n);
    }
  }
  p.allow_text_ = join(entries);
  p.listeners_ = split(listen);
  for (const auto& l : p.listeners_)
    if (l.find_first_of(":/[]=") != std::string::npos)
      throw ConfigError("listen '" + l + "': a listener name (as in --listen NAME=ADDR), not an address");
  p.listen_text_ = join(p.listeners_);
  return p;
}

AccessPolicy AccessPolicy::from_saved(std::string_view saved) {
  const auto nl = saved.find('\n');
  if (!saved.starts_with("allow=") || nl == std::string_view::npos || saved.substr(nl + 1, 7) != "listen=")
    throw ConfigError("saved access rules '" + std::string(saved) + "' are not allow=...\\nlisten=...");
  return parse(saved.substr(6, nl - 6), saved.substr(nl + 8));
}

bool AccessPolicy::published_on(const std::string& listener) const {
  return listeners_.empty() || std::find(listeners_.begin(), listeners_.end(), listener) != listeners_.end();
}

bool AccessPolicy::matches_address(const std::string& address) const {
  std::array<uint8_t, 16> bytes{};
  bool v6 = false;
  if (address.empty() || !parse_ip(address, bytes, v6)) return false;
  return std::any_of(nets_.begin(), nets_.end(),
                     [&](const Net& n) { return n.v6 == v6 && same_prefix(n.bytes, bytes, n.prefix); });
}

bool AccessPolicy::matches_unix(const AccessClient& c) const {
  if (std::find(uids_.begin(), uids_.end(), *c.uid) != uids_.end()) return true;
  auto listed = [&](gid_t g) { return std::find(gids_.begin(), gids_.end(), g) != gids_.end(); };
  // The peer process's own groups as the kernel holds them (SO_PEERCRED,
  // SO_PEERGROUPS; FUSE: the caller's): no group database on the event
  // loop, and the same answer the kernel gives for a file's group.
  return (c.gid && listed(*c.gid)) || std::any_of(c.groups.begin(), c.groups.end(), listed);
}

bool AccessPolicy::allows_local_user(const AccessClient& c) const {
  if (uids_.empty() && gids_.empty()) return true;
  return c.uid && matches_unix(c);
}

bool AccessPolicy::allows(const AccessClient& c) const {
  if (!published_on(c.listener)) return false;
  if (allow_text_.empty()) return true;
  if (matches_address(c.address)) return true;
  if (c.uid && matches_unix(c)) return true;
  for (const auto& name : c.cert_names)
    if (std::find(certs_.begin(), certs_.end(), name) != certs_.end()) return true;
  if (!c.psk_name.empty() && std::find(psks_.begin(), psks_.end(), c.psk_name) != psks_.end()) return true;
  return false;
}

}  // namespace blockway::core
